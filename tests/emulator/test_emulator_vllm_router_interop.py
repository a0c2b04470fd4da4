"""Interop: vllm-router (PyPI, Rust — written by others) routes on emulated pods' KV events.

Variant of `tests/events/test_vllm_router_interop.py` where the events come from the engine
model of two in-process emulator pods instead of hand-made batches: we warm a prompt on one pod
by sending it there directly (its cache stores the blocks and publishes them), then ask
`vllm-router --policy kv_aware` for the same prompt and check which pod served it. The pods use
the tiny WordLevel tokenizer of that test (vllm-router tokenizes with it and keys blocks from
the events' token ids), the map wire form (what vllm-router 0.1.17 accepts) and vLLM's default
empty topic. Skipped when the binary is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from router.emulator.server import EmulatorPod
from tests.events.test_vllm_router_interop import VLLM_ROUTER, build_tokenizer, free_port

pytestmark = pytest.mark.skipif(VLLM_ROUTER is None, reason="vllm-router is not installed")


def _prompt(seed: int, words: int = 70) -> str:
    return " ".join(f"w{(seed * 131 + i * 7) % 3999 + 1}" for i in range(words))


async def _served(c: httpx.AsyncClient, pods: dict[str, EmulatorPod]) -> dict[str, int]:
    return {n: len((await c.get(f"{p.url}/admin/timings")).json()) for n, p in pods.items()}


async def test_vllm_router_follows_the_emulators_kv_events(start_pod, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    build_tokenizer(tmp_path / "tiny-model")
    tok = str(tmp_path / "tiny-model" / "tokenizer.json")
    pods: dict[str, EmulatorPod] = {}
    for name, seed in (("A", 1), ("B", 2)):
        pods[name] = await start_pod(
            model="tiny",
            tokenizer=tok,
            seed=seed,
            events_bind="tcp://127.0.0.1:0",
            events_wire_form="map",
            events_topic="",
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(VLLM_ROUTER), "--host", "127.0.0.1", "--port", str(port), "--policy", "kv_aware",
        "--kv-event-block-size", "16", "--kv-event-model", str(tmp_path / "tiny-model"),
        "--log-level", "debug", "--worker-urls", *(p.url for p in pods.values()),
    ]  # fmt: skip
    for p in pods.values():
        cmd += ["--kv-event-source", f"{p.url}={p.kv_events_endpoint}"]
    log_path = tmp_path / "vllm-router.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        async with httpx.AsyncClient(timeout=10.0) as c:
            async with asyncio.timeout(20):
                while True:
                    assert proc.poll() is None, log_path.read_text()[-2000:]
                    with contextlib.suppress(httpx.HTTPError):
                        if (await c.get(f"{url}/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)

            async def route_after_warming(target: str, seed: int) -> str:
                body = {"model": "tiny", "prompt": _prompt(seed), "max_tokens": 2}
                assert (await c.post(f"{pods[target].url}/v1/completions", json=body)).is_success
                await asyncio.sleep(0.1)
                before = await _served(c, pods)
                r = await c.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                after = await _served(c, pods)
                (winner,) = [n for n in pods if after[n] > before[n]]
                return winner

            # ZMQ subscriptions join asynchronously: probe each pod with fresh prompts first.
            seed = 10_000
            for name in pods:
                async with asyncio.timeout(15):
                    while True:
                        seed += 1
                        if await route_after_warming(name, seed) == name:
                            break
            for seed, target in ((1, "B"), (2, "A"), (3, "B"), (4, "A")):
                assert await route_after_warming(target, seed) == target, log_path.read_text()[
                    -3000:
                ]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
