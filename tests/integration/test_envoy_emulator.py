"""Through a real Envoy to emulated vLLM pods (`router.emulator.EmulatedFleet`, separate
processes), with the picker started from the config the fleet writes (`--write-config`).

The pods publish real KV events; the picker subscribes to each (connect mode) and feeds its
precise index. So "the request landed on the pod the picker chose" is shown by the pod
itself: the blocks of the prompt appear in the index under the chosen pod, reported by that
pod's own events — and the next request sharing the prefix goes there on a precise hit.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
from envoy_stack import requires_envoy

from envoy_extproc.envoy_process import EnvoyProcess
from envoy_extproc.server import PickerServer
from envoy_extproc.settings import ExtProcSettings
from router.config import load_config
from router.emulator.fleet import EmulatedFleet
from router.scheduler import Decision

pytestmark = requires_envoy


def build_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(2000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


async def test_emulated_pods_report_the_prefix_where_the_picker_sent_it(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path / "tok")
    fleet = EmulatedFleet(pods=3, speedup=50.0, pod_args=["--tokenizer", str(tokenizer)])
    decisions: list[Decision] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(fleet)
        cfg = tmp_path / "router.yaml"
        fleet.write_config(cfg)
        settings = ExtProcSettings(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0)
        picker = PickerServer(load_config(cfg), settings, config_path=cfg)
        await picker.start()
        stack.push_async_callback(picker.stop, 0)
        assert picker.feeds.precise_index is not None and picker.ports is not None
        on_pick = picker.scheduler.on_pick

        def record(decision: Decision, now: float | None = None) -> None:
            decisions.append(decision)
            on_pick(decision, now)

        picker.scheduler.on_pick = record  # type: ignore[method-assign]
        envoy = EnvoyProcess("FULL_DUPLEX_STREAMED", picker.ports.grpc)
        await stack.enter_async_context(envoy)
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=envoy.url, timeout=30))
        model = fleet.pods[0].model
        prefix = " ".join(f"w{i % 1999 + 1}" for i in range(256))
        r = await client.post(
            "/v1/completions", json={"model": model, "prompt": prefix + " w7", "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        first = decisions[-1]
        keys = first.request.block_keys
        assert keys and len(keys) >= 16  # 257 tokens in blocks of 16

        def reported() -> bool:
            return (
                picker.feeds.precise_index.longest_prefix(keys[: len(keys) - 1]).get(
                    first.target, 0
                )
                > 0
            )

        for _ in range(100):
            if reported():
                break
            await asyncio.sleep(0.05)
        assert reported(), "the chosen pod's KV events never reported the prompt"
        others = {p.endpoint for p in fleet.pods} - {first.target}
        held = picker.feeds.precise_index.longest_prefix(keys)
        assert not any(held.get(ep) for ep in others)
        for i in range(3):
            r = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": prefix + f" w{100 + i}", "max_tokens": 2},
            )
            assert r.status_code == 200, r.text
            assert decisions[-1].target == first.target
