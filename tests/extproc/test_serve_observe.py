"""`kvroute serve`: tracing spans and the pod's `traceparent` in the routing mutation, and a
config reload swapping the picker, against emulated pods over a real gRPC channel."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
import httpx
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from envoy_extproc.server import PickerServer
from envoy_extproc.settings import ExtProcSettings
from router.config import load_config
from router.emulator.fleet import EmulatedFleet
from router.ops_settings import TracingSettings
from router.tracing import RequestTracing
from tests.extproc.extproc_client import (
    body_msg,
    headers_msg,
    post_headers,
    response_headers_msg,
    set_headers,
)
from tests.proxy.test_config_reload import CACHE_AWARE

SETTINGS = ExtProcSettings(
    host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, lame_duck_s=0
)
ROUND_ROBIN = """
plugins:
  - type: round-robin-picker
schedulingProfiles:
  - name: rr
    plugins: [{pluginRef: round-robin-picker}]
"""
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _write(path: Path, fleet: EmulatedFleet, plugins: str, extra: str = "") -> None:
    pods = "".join(f"  - {{endpoint: '{p.endpoint}', models: ['{p.model}']}}\n" for p in fleet.pods)
    path.write_text(f"pods:\n{pods}prefix_index: {{mode: approximate}}\n{plugins}{extra}")


async def _route_one(port: int, model: str, traceparent: str) -> dict[str, str]:
    """One request through the servicer as Envoy sends it; the routing mutation's headers."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        await call.write(headers_msg(post_headers(traceparent=traceparent)))
        await call.read()  # headers answered at once (BUFFERED)
        await call.write(body_msg(body.encode(), True))
        routed = await call.read()
        await call.write(response_headers_msg(200, "application/json", end=True))
        await call.read()
        await call.done_writing()
        return set_headers(routed)


async def test_serve_traces_a_request_and_hands_the_pod_its_upstream_span(tmp_path):
    exporter = InMemorySpanExporter()
    tracing = RequestTracing(TracingSettings(enabled=True), exporter=exporter)
    path = tmp_path / "router.yaml"
    async with EmulatedFleet(pods=2, speedup=50, events="none") as fleet:
        _write(path, fleet, CACHE_AWARE)
        server = PickerServer(load_config(path), SETTINGS, tracing=tracing)
        async with server:
            traceparent = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
            mutation = await _route_one(server.ports.grpc, fleet.pods[0].model, traceparent)
            for _ in range(100):  # the stream settles when the servicer sees its end
                if any(s.name.startswith("POST") for s in exporter.get_finished_spans()):
                    break
                await asyncio.sleep(0.02)
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    root = by_name["POST /v1/chat/completions"]
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    upstream = by_name["upstream"]
    pick = mutation["x-gateway-destination-endpoint"]
    assert upstream.attributes["server.address"] == pick == root.attributes["kvroute.pick"]
    assert mutation["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.context.span_id:016x}-01"
    for name in ("tokenize", "schedule", "upstream"):
        assert by_name[name].parent.span_id == root.context.span_id, name
    for name in ("scorer prefix-cache-scorer", "picker max-score-picker"):
        assert by_name[name].parent.span_id == by_name["schedule"].context.span_id, name


async def test_serve_reloads_its_profiles_and_counts_it(tmp_path):
    path = tmp_path / "router.yaml"
    async with EmulatedFleet(pods=2, speedup=50, events="none") as fleet:
        _write(path, fleet, ROUND_ROBIN)
        server = PickerServer(load_config(path), SETTINGS, config_path=path)
        async with server:
            picker = server.servicer.picker
            _write(path, fleet, CACHE_AWARE)
            assert server.reloader.reload("test")
            assert server.servicer.picker is not picker
            assert list(server.servicer.picker.scheduler.profiles) == ["cache"]
            assert server.scheduler.approx_index is picker.scheduler.approx_index
            mutation = await _route_one(server.ports.grpc, fleet.pods[0].model, "")
            assert mutation["x-gateway-destination-endpoint"] in {p.endpoint for p in fleet.pods}
            url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
            async with httpx.AsyncClient() as client:
                text = (await client.get(url)).text
    assert 'kvroute_config_reloads_total{result="success"} 1.0' in text
    assert f'kvroute_config_hash{{hash="{server.reloader.hash}"}} 1.0' in text


async def test_serve_access_log_is_one_line_per_settled_request(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kvroute.access")
    path = tmp_path / "router.yaml"
    async with EmulatedFleet(pods=1, speedup=50, events="none") as fleet:
        _write(path, fleet, ROUND_ROBIN, "logging: {access_log: true}\n")
        server = PickerServer(load_config(path), SETTINGS)
        async with server:
            await _route_one(server.ports.grpc, fleet.pods[0].model, "")
            for _ in range(100):
                if any(r.name == "kvroute.access" for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
    lines = [r for r in caplog.records if r.name == "kvroute.access"]
    assert len(lines) == 1
    assert (lines[0].model, lines[0].pod, lines[0].status) == (
        fleet.pods[0].model,
        fleet.pods[0].endpoint,
        "ok",
    )
    assert lines[0].getMessage().startswith("chat ok model=")
