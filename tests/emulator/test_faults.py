"""Fault injection by settings and by `POST /admin/faults` (on the admin port only)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from router.emulator.server import EmulatorPod
from router.emulator.settings import EmulatorSettings, FaultSettings
from tests.emulator.conftest import MODEL

BODY = {"model": MODEL, "prompt": "fault test prompt", "max_tokens": 8}


@pytest.fixture
async def pod(start_pod) -> EmulatorPod:  # type: ignore[no-untyped-def]
    """This module's pods have an admin port (the conftest's `client` talks to the API)."""
    return await start_pod(admin_port=0)


@pytest.fixture
async def admin(pod: EmulatorPod) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pod.admin_url, timeout=10.0) as c:
        yield c


async def test_error_rate_answers_openai_errors(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(faults=FaultSettings(error_rate=1.0, error_status=500))
    async with httpx.AsyncClient(base_url=pod.url) as c:
        r = await c.post("/v1/completions", json=BODY)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "InternalServerError" and r.json()["error"]["code"] == 500


async def test_admin_endpoint_changes_faults_and_rejects_unknown_fields(client, admin) -> None:  # type: ignore[no-untyped-def]
    r = await admin.post("/admin/faults", json={"error_rate": 1.0, "error_status": 503})
    assert r.status_code == 200 and r.json()["error_rate"] == 1.0
    assert (await client.post("/v1/completions", json=BODY)).status_code == 503
    assert (await admin.get("/admin/faults")).json()["error_status"] == 503
    bad = await admin.post("/admin/faults", json={"eror_rate": 1})
    assert bad.status_code == 400 and "eror_rate" in bad.json()["error"]["message"]
    assert (await admin.post("/admin/faults", json={"error_rate": 2})).status_code == 400
    await admin.post("/admin/faults", json={"error_rate": 0, "unhealthy": True})
    assert (await client.post("/v1/completions", json=BODY)).status_code == 200
    assert (await client.get("/health")).status_code == 503


async def test_metrics_error_fails_only_the_exporter(client, admin) -> None:  # type: ignore[no-untyped-def]
    await admin.post("/admin/faults", json={"metrics_error": True})
    assert (await client.get("/metrics")).status_code == 500
    assert (await client.post("/v1/completions", json=BODY)).status_code == 200
    assert (await client.get("/health")).status_code == 200
    await admin.post("/admin/faults", json={"metrics_error": False})
    r = await client.get("/metrics")
    counted = 'kvroute_emulator_faults_injected_total{kind="metrics_error"} 1.0'
    assert r.status_code == 200 and counted in r.text


async def test_crash_after_tokens_breaks_the_stream(client, admin) -> None:  # type: ignore[no-untyped-def]
    await admin.post("/admin/faults", json={"crash_after_tokens": 3})
    chunks = []
    opts = {"include_usage": True, "continuous_usage_stats": True}
    body = {**BODY, "stream": True, "stream_options": opts}
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    chunks.append(json.loads(line[len("data: ") :]))
    assert chunks and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_stall_and_latency_spike_delay_the_answer(client, admin) -> None:  # type: ignore[no-untyped-def]
    await admin.post("/admin/faults", json={"stall_rate": 1.0, "stall_s": 0.3})
    t = time.perf_counter()
    assert (await client.post("/v1/completions", json={**BODY, "stream": True})).status_code == 200
    assert time.perf_counter() - t >= 0.3
    await admin.post(
        "/admin/faults", json={"stall_rate": 0, "latency_spike_rate": 1.0, "latency_spike_s": 0.3}
    )
    t = time.perf_counter()
    assert (await client.post("/v1/completions", json=BODY)).status_code == 200
    assert time.perf_counter() - t >= 0.3


async def test_refused_connections_come_back(pod: EmulatorPod) -> None:
    async with httpx.AsyncClient(timeout=2.0) as c:
        r = await c.post(f"{pod.admin_url}/admin/faults", json={"refuse_connections_s": 30})
        assert r.status_code == 200
        with pytest.raises(httpx.ConnectError):
            await c.get(f"{pod.url}/health")
        await c.post(f"{pod.admin_url}/admin/faults", json={"refuse_connections_s": 0})
        assert (await c.get(f"{pod.url}/health")).status_code == 200


async def test_admin_is_never_on_the_api_or_side_port(start_pod) -> None:  # type: ignore[no-untyped-def]
    plain: EmulatorPod = await start_pod()
    with_admin: EmulatorPod = await start_pod(admin_port=0)
    assert plain.admin is None and plain.ready_info()["admin"] is None
    async with httpx.AsyncClient(timeout=2.0) as c:
        for p in (plain, with_admin):
            for base in (p.url, f"http://{p.side_channel}"):
                for method in ("GET", "POST"):
                    r = await c.request(method, f"{base}/admin/faults", json={"error_rate": 1})
                    assert r.status_code in (404, 405), (base, method, r.status_code)
        assert (await c.get(f"{with_admin.admin_url}/admin/faults")).json()["error_rate"] == 0.0
        assert (await c.post(f"{plain.url}/v1/completions", json=BODY)).status_code == 200
    with pytest.raises(ValueError, match="admin_port 8000 must differ"):
        EmulatorSettings(port=8000, admin_port=8000)


async def test_kv_event_faults_drop_batches_and_reset_the_sequence(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(events_bind="tcp://127.0.0.1:0", admin_port=0)
    pub = pod.runtime.publisher
    assert pub is not None
    async with httpx.AsyncClient(base_url=pod.url) as c:
        await c.post("/v1/completions", json={**BODY, "prompt": list(range(64))})
        before = pub.next_seq
        assert before > 0
        r = await c.post(
            f"{pod.admin_url}/admin/faults", json={"reset_kv_event_seq": True, "drop_kv_events": 2}
        )
        assert r.status_code == 200
        assert pub.next_seq == 0
        text = (await c.get("/metrics")).text
    assert 'kvroute_emulator_faults_injected_total{kind="drop_kv_events"} 2.0' in text
    assert 'kvroute_emulator_faults_injected_total{kind="reset_kv_event_seq"} 1.0' in text
