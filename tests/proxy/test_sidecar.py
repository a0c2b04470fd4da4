"""The decode sidecar: two-phase on x-prefiller-host-port, allowlist, pass-through."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx

from router.proxy.app import RunningServer
from router.sidecar import SidecarApp, SidecarSettings

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 3,
}


@contextlib.asynccontextmanager
async def sidecar(decode, **fields) -> AsyncIterator[httpx.AsyncClient]:
    app = SidecarApp(SidecarSettings(decode=decode.endpoint, **fields))
    async with (
        RunningServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10.0) as client,
    ):
        yield client


async def test_allowed_prefill_host_runs_the_two_phase_flow(pods):
    prefill, decode = pods
    async with sidecar(decode, allow=(prefill.endpoint,)) as client:
        r = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"x-prefiller-host-port": prefill.endpoint},
        )
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert prefill.received[0].body["kv_transfer_params"]["do_remote_decode"] is True
    leg2 = decode.received[0]
    assert leg2.body["kv_transfer_params"]["remote_engine_id"] == f"engine-{prefill.port}"
    assert "x-prefiller-host-port" not in {k.lower() for k in leg2.headers}


async def test_prefill_host_outside_the_allowlist_gets_403_and_no_request_is_sent(pods):
    prefill, decode = pods
    async with sidecar(decode, allow=(prefill.endpoint,)) as client:
        r = await client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"x-prefiller-host-port": "169.254.169.254:80"},
        )
        assert r.status_code == 403
        assert r.json()["error"]["code"] == 403
        assert r.headers["x-kvroute-error"] == "prefill_target_not_allowed"
        assert decode.received == [] and prefill.received == []
        ok = await client.post("/v1/chat/completions", json=CHAT)
    assert ok.status_code == 200 and ok.json()["served_by"] == decode.endpoint


async def test_allowlist_from_a_router_registry(pods, proxy):
    prefill, decode = pods
    async with proxy(pods, roles=["prefill", "decode"]) as (_app, router):
        url = str(router.base_url).rstrip("/") + "/debug/pods"
        async with sidecar(decode, registry_url=url) as client:
            allowed = await client.post(
                "/v1/completions",
                json={"model": "m", "prompt": "hi", "max_tokens": 2},
                headers={"x-prefiller-host-port": prefill.endpoint},
            )
            # The decode pod is in the registry, but not as a prefill pod.
            refused = await client.post(
                "/v1/completions",
                json={"model": "m", "prompt": "hi", "max_tokens": 2},
                headers={"x-prefiller-host-port": "10.9.9.9:8000"},
            )
    assert allowed.status_code == 200 and refused.status_code == 403
    assert len(prefill.received) == 1


async def test_without_the_header_requests_and_other_paths_pass_through(pods):
    _prefill, decode = pods
    async with sidecar(decode) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
        models = await client.get("/v1/models")
        health = await client.get("/sidecar/health")
    assert r.status_code == 200 and "kv_transfer_params" not in decode.received[0].body
    assert models.json()["data"][0]["id"] == "m"
    assert health.status_code == 200


async def test_failed_prefill_leg_decodes_locally(pods):
    prefill, decode = pods
    prefill.mode = "error500"
    async with sidecar(decode, allow=(prefill.endpoint,)) as client:
        r = await client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"x-prefiller-host-port": prefill.endpoint},
        )
        metrics = (await client.get("/sidecar/metrics")).text
    assert r.status_code == 200
    assert "kv_transfer_params" not in decode.received[0].body
    assert 'outcome="prefill_failed"' in metrics and json.loads(r.text)["choices"]
