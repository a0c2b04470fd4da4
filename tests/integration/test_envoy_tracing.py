"""Tracing through a real Envoy: the emulated pod receives the `traceparent` of the picker's
`upstream` span (added to Envoy's header mutation), in the client's trace."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from envoy_stack import requires_envoy
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from envoy_extproc.envoy_process import EnvoyProcess
from envoy_extproc.server import PickerServer
from envoy_extproc.settings import ExtProcSettings
from router.config import load_config
from router.emulator.fleet import EmulatedFleet
from router.ops_settings import TracingSettings
from router.tracing import RequestTracing

pytestmark = requires_envoy
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_the_pod_behind_envoy_receives_the_upstream_span_context(tmp_path, mode):
    exporter = InMemorySpanExporter()
    tracing = RequestTracing(TracingSettings(enabled=True), exporter=exporter)
    async with contextlib.AsyncExitStack() as stack:
        fleet = await stack.enter_async_context(EmulatedFleet(pods=2, speedup=50, events="none"))
        cfg = tmp_path / "router.yaml"
        fleet.write_config(cfg)
        settings = ExtProcSettings(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0)
        picker = PickerServer(load_config(cfg), settings, tracing=tracing)
        await picker.start()
        stack.push_async_callback(picker.stop, 0)
        assert picker.ports is not None
        envoy = await stack.enter_async_context(EnvoyProcess(mode, picker.ports.grpc))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=envoy.url, timeout=30))
        body = {"model": fleet.pods[0].model, "prompt": "hello there", "max_tokens": 2}
        headers = {"traceparent": f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"}
        r = await client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        for _ in range(100):  # the request span ends when the stream settles
            if any(s.name.startswith("POST") for s in exporter.get_finished_spans()):
                break
            await asyncio.sleep(0.05)
        seen = {
            p.endpoint: (await client.get(f"{p.url}/admin/traceparents")).json() for p in fleet.pods
        }
    spans = {s.name: s for s in exporter.get_finished_spans()}
    upstream = spans["upstream"]
    pick = upstream.attributes["server.address"]
    assert seen[pick] == [f"00-{CLIENT_TRACE}-{upstream.context.span_id:016x}-01"]
    assert all(v == [] for ep, v in seen.items() if ep != pick)
    assert spans["POST /v1/completions"].attributes["kvroute.pick"] == pick
