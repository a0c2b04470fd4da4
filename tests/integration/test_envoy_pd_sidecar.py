"""P/D through a real Envoy, all the way: picker → decode pod's sidecar → prefill pod → decode.

Emulated vLLM pods (one prefill, one decode, separate processes) and the decode pod's sidecar
(`kvroute sidecar`, in this process) sit behind Envoy; the picker lists the prefill pod and
the sidecar's address as the decode pod. A request is routed to the sidecar with
`x-prefiller-host-port` naming the prefill pod; the sidecar runs the prefill leg there and
the decode leg on its decode pod, and the client gets the completion.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import httpx
from envoy_stack import requires_envoy

from envoy_extproc.envoy_process import EnvoyProcess
from envoy_extproc.server import PickerServer
from envoy_extproc.settings import ExtProcSettings
from router.config import load_config
from router.emulator.fleet import EmulatedFleet
from router.proxy.app import RunningServer
from router.scheduler import Decision
from router.sidecar import SidecarApp, SidecarSettings

pytestmark = requires_envoy

PD_PLUGINS = """\
plugins:
  - type: pd-profile-handler
    parameters: {threshold: 0, decodeProfile: decode, prefillProfile: prefill}
  - type: decode-filter
  - type: prefill-filter
  - type: max-score-picker
schedulingProfiles:
  - name: decode
    plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}]
  - name: prefill
    plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}]
"""


async def prompt_tokens(client: httpx.AsyncClient, url: str) -> float:
    text = (await client.get(f"{url}/metrics")).text
    return sum(float(v) for v in re.findall(r"^vllm:prompt_tokens_total\S* (\S+)$", text, re.M))


async def test_pd_request_completes_through_the_decode_sidecar(tmp_path: Path) -> None:
    decisions: list[Decision] = []
    async with contextlib.AsyncExitStack() as stack:
        fleet = await stack.enter_async_context(EmulatedFleet(pods=2, pd=(1, 1), speedup=50.0))
        prefill = next(p for p in fleet.pods if p.role == "prefill")
        decode = next(p for p in fleet.pods if p.role == "decode")
        sidecar = SidecarApp(SidecarSettings(decode=decode.endpoint, allow=(prefill.endpoint,)))
        side = await stack.enter_async_context(RunningServer(sidecar))
        cfg = tmp_path / "router.yaml"
        cfg.write_text(
            "pods:\n"
            f"  - {{endpoint: '{prefill.endpoint}', role: prefill, models: ['{prefill.model}']}}\n"
            f"  - {{endpoint: '{side.endpoint}', role: decode, models: ['{decode.model}']}}\n"
            + PD_PLUGINS
        )
        settings = ExtProcSettings(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0)
        picker = PickerServer(load_config(cfg), settings, config_path=cfg)
        await picker.start()
        stack.push_async_callback(picker.stop, 0)
        assert picker.ports is not None
        on_pick = picker.scheduler.on_pick

        def record(decision: Decision, now: float | None = None) -> None:
            decisions.append(decision)
            on_pick(decision, now)

        picker.scheduler.on_pick = record  # type: ignore[method-assign]
        envoy = EnvoyProcess("FULL_DUPLEX_STREAMED", picker.ports.grpc)
        await stack.enter_async_context(envoy)
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        before = await prompt_tokens(client, prefill.url)
        body = {
            "model": decode.model,
            "messages": [{"role": "user", "content": "summarise this please " * 40}],
            "max_tokens": 4,
            "stream": True,
        }
        r = await client.post(f"{envoy.url}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text[:300]
        assert r.text.endswith("data: [DONE]\n\n")
        d = decisions[-1]
        assert (d.target, d.prefill) == (side.endpoint, prefill.endpoint)
        # The prefill leg ran on the prefill pod the picker named.
        assert await prompt_tokens(client, prefill.url) > before
        assert d._done
