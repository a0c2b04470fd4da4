"""Tracing (`tracing:`): the proxy's spans against emulated pods, exported in memory."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet
from router.ops_settings import TracingSettings
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings
from router.tracing import RequestTracing

PLUGINS = """
plugins:
  - type: prefix-cache-scorer
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - {pluginRef: prefix-cache-scorer, weight: 2}
      - {pluginRef: queue-scorer, weight: 1}
      - {pluginRef: max-score-picker}
"""
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _config(fleet: EmulatedFleet) -> str:
    pods = "".join(f"  - {{endpoint: '{p.endpoint}', models: ['{p.model}']}}\n" for p in fleet.pods)
    return f"pods:\n{pods}prefix_index: {{mode: approximate}}\n{PLUGINS}"


async def test_a_request_is_a_trace_continued_from_the_client_and_carried_to_the_pod():
    exporter = InMemorySpanExporter()
    tracing = RequestTracing(TracingSettings(enabled=True), exporter=exporter)
    async with EmulatedFleet(pods=2, speedup=50, events="none") as fleet:
        model = fleet.pods[0].model
        app = ProxyApp(parse_config(_config(fleet)), ProxySettings(), tracing=tracing)
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=20) as client,
        ):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200
            seen = {}
            for p in fleet.pods:
                seen[p.endpoint] = (await client.get(f"{p.url}/admin/traceparents")).json()
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    root = by_name["POST /v1/chat/completions"]
    # The client's trace goes on: same trace, the request span a child of the client's span.
    assert all(f"{s.context.trace_id:032x}" == CLIENT_TRACE for s in spans)
    assert f"{root.parent.span_id:016x}" == CLIENT_SPAN
    for name in ("parse", "tokenize", "schedule", "upstream"):
        assert by_name[name].parent.span_id == root.context.span_id, name
    schedule = by_name["schedule"]
    plugin_spans = {
        "scorer prefix-cache-scorer",
        "scorer queue-scorer",
        "picker max-score-picker",
    }
    for name in plugin_spans:
        assert by_name[name].parent.span_id == schedule.context.span_id, name
    pick = root.attributes["kvroute.pick"]
    assert root.attributes["kvroute.model"] == model
    assert root.attributes["kvroute.profile"] == "default"
    assert root.attributes["kvroute.prompt_tokens"] > 0
    assert root.attributes["kvroute.uncached_tokens"] >= 0
    assert root.attributes["kvroute.captured_tokens"] == 0  # a first request: nothing cached
    assert root.attributes["http.response.status_code"] == 200
    upstream = by_name["upstream"]
    assert upstream.attributes["server.address"] == pick
    # The picked pod received the upstream span's context; the other pod got nothing.
    expected = f"00-{CLIENT_TRACE}-{upstream.context.span_id:016x}-01"
    assert seen[pick] == [expected]
    assert all(v == [] for ep, v in seen.items() if ep != pick)


async def test_without_tracing_nothing_is_wrapped_and_the_client_context_passes_through():
    async with EmulatedFleet(pods=1, speedup=50, events="none") as fleet:
        model = fleet.pods[0].model
        app = ProxyApp(parse_config(_config(fleet)), ProxySettings())
        assert app.tracing is None
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=20) as client,
        ):
            assert type(app.forwarder).__name__ == "Forwarder"
            assert "schedule" not in vars(app.scheduler)
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
            body = {"model": model, "prompt": "hello", "max_tokens": 2}
            r = await client.post(
                "/v1/completions", json=body, headers={"traceparent": traceparent}
            )
            assert r.status_code == 200
            pod = fleet.pods[0]
            assert (await client.get(f"{pod.url}/admin/traceparents")).json() == [traceparent]


def test_an_unsampled_request_records_nothing_but_still_propagates_its_context():
    exporter = InMemorySpanExporter()
    tracing = RequestTracing(TracingSettings(enabled=True, sample_ratio=0.0), exporter=exporter)
    rt = tracing.start_request("POST /v1/completions", {})
    _span, traceparent = tracing.start_upstream("10.0.0.1:8000")
    tracing.end_request(rt, 200)
    assert exporter.get_finished_spans() == ()
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    assert int(flags, 16) & 1 == 0  # the sampled flag is off: the pod need not trace either
    assert int(trace_id, 16) and int(span_id, 16)
    # A client's sampled context is followed whatever the ratio.
    rt = tracing.start_request(
        "POST /v1/completions", {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    )
    tracing.end_request(rt, 200)
    assert [f"{s.context.trace_id:032x}" for s in exporter.get_finished_spans()] == [CLIENT_TRACE]
