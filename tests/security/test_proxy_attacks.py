"""`kvroute proxy` under attack: SSRF through the body, unrouted paths, P/D parameters.

Real emulated vLLM pods (in-process, recording what reached their engine) behind a real proxy
on loopback; the canary stands in for an internal host. Started once for the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
import pytest_asyncio

from router.config import parse_config
from router.emulator.server import EmulatorPod
from router.proxy.app import ProxyApp, RunningServer
from tests.proxy.test_emulated_fleet import PD_PLUGINS, SETTINGS
from tests.security.canary import Canary
from tests.security.conftest import (
    FORBIDDEN,
    MODEL,
    POD,
    assert_clean,
    attack_chat,
    attack_completion,
    record_bodies,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
#: The proxy's own endpoints (router.proxy.app.CONTROL_PATHS), answered by the router.
CONTROL_PATHS = {"/health", "/ready", "/metrics", "/debug/pods"}


@dataclass
class Fleet:
    pods: list[EmulatorPod]
    #: Per pod, what reached its engine.
    bodies: list[list[dict[str, Any]]]
    app: ProxyApp
    client: httpx.AsyncClient
    #: What reached any pod's engine, in arrival order.
    all_bodies: list[dict[str, Any]]

    def received(self) -> list[dict[str, Any]]:
        return self.all_bodies


@contextlib.asynccontextmanager
async def fleet(roles: list[str], tail: str = "") -> AsyncIterator[Fleet]:
    async with contextlib.AsyncExitStack() as stack:
        pods = [
            await stack.enter_async_context(EmulatorPod(replace(POD, role=r, precise_timers=False)))
            for r in roles
        ]
        lines = "".join(
            f"  - {{endpoint: '{p.endpoint}', role: {r}, models: [{MODEL}]}}\n"
            for p, r in zip(pods, roles, strict=True)
        )
        config = f"pods:\n{lines}prefix_index: {{mode: approximate}}\nseed: 3\n{tail}"
        app = ProxyApp(parse_config(config), SETTINGS)
        server = await stack.enter_async_context(RunningServer(app))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=server.url, timeout=20))
        every: list[dict[str, Any]] = []
        per_pod = [record_bodies(p) for p in pods]
        for p in pods:
            record_bodies(p, every)
        yield Fleet(pods, per_pod, app, client, every)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain() -> AsyncIterator[Fleet]:
    async with fleet(["both", "both"]) as f:
        yield f


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pd() -> AsyncIterator[Fleet]:
    async with fleet(["prefill", "decode"], PD_PLUGINS) as f:
        yield f


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_proxy_strips_kv_transfer_params_before_any_pod(
    plain: Fleet, canary: Canary, path: str, stream: bool
) -> None:
    make = attack_chat if path == "/v1/chat/completions" else attack_completion
    before = len(plain.received())
    r = await plain.client.post(path, json=make(canary, stream=stream))
    assert r.status_code == 200, r.text
    [got] = plain.received()[before:]
    assert_clean(got)
    assert got["stream"] is stream and got["model"] == MODEL
    await canary.assert_untouched()
    page = (await plain.client.get("/metrics")).text
    assert 'kvroute_proxy_stripped_fields_total{field="kv_transfer_params"}' in page


async def test_proxy_answers_models_and_refuses_every_other_path(
    plain: Fleet, canary: Canary
) -> None:
    before = len(plain.received())
    for method, path in FORBIDDEN:
        r = await plain.client.request(method, path, json={"error_rate": 1.0, "model": MODEL})
        if path in CONTROL_PATHS:  # the proxy's own page, never the pod's
            assert "vllm:" not in r.text, (method, path)
            continue
        assert r.status_code in (404, 405), (method, path, r.status_code, r.text)
        err = r.json()["error"]
        reason = r.headers["x-kvroute-error"]
        assert reason in ("unknown_path", "method_not_allowed"), (method, path, err)
        assert err["code"] == r.status_code, (method, path, err)
        assert err["type"] == ("NotFoundError" if r.status_code == 404 else "MethodNotAllowedError")
    models = await plain.client.get("/v1/models")
    assert models.status_code == 200 and MODEL in [m["id"] for m in models.json()["data"]]
    assert plain.received()[before:] == []
    # The POST /admin/faults above changed no pod: requests are served as before.
    ok = await plain.client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert ok.status_code == 200
    assert all(p.runtime.faults.settings.error_rate == 0 for p in plain.pods)
    await canary.assert_untouched()


async def test_proxy_pd_sets_kv_transfer_params_only_from_its_prefill_pod(
    pd: Fleet, canary: Canary
) -> None:
    prefill = pd.pods[0]
    pd.bodies[0].clear()
    pd.bodies[1].clear()
    r = await pd.client.post("/v1/chat/completions", json=attack_chat(canary, "long doc " * 80))
    assert r.status_code == 200, r.text
    [leg1] = pd.bodies[0]
    assert leg1["kv_transfer_params"]["do_remote_decode"] is True
    assert leg1["kv_transfer_params"]["remote_host"] is None
    [leg2] = pd.bodies[1]
    params = leg2["kv_transfer_params"]
    assert params["remote_engine_id"] == prefill.runtime.engine_uuid
    assert f"{params['remote_host']}:{params['remote_port']}" == prefill.side_channel
    assert leg2["vllm_xargs"] == {"keep_me": 7}
    await canary.assert_untouched()


async def test_proxy_pd_fallback_decodes_the_client_body_without_its_params(
    pd: Fleet, canary: Canary
) -> None:
    prefill = pd.pods[0]
    pd.bodies[1].clear()
    prefill.runtime.faults.update({"error_rate": 1.0})
    try:
        r = await pd.client.post("/v1/chat/completions", json=attack_chat(canary, "fallback"))
    finally:
        prefill.runtime.faults.update({"error_rate": 0.0})
    assert r.status_code == 200, r.text
    [leg2] = pd.bodies[1]
    assert_clean(leg2)
    page = (await pd.client.get("/metrics")).text
    assert 'kvroute_proxy_pd_requests_total{outcome="prefill_failed"}' in page
    await canary.assert_untouched()
