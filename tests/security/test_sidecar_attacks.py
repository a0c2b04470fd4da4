"""`kvroute sidecar` under attack: SSRF through the body (with and without a prefill header,
and through the fallback after a failed prefill leg), prefill hosts outside the pool in every
spelling, repeated headers.

Real emulated vLLM pods (a prefill pod, and a decode pod recording what reached its engine),
one sidecar with a static allowlist and one that learns the pool from a router's
`/debug/pods`; started once for the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
import pytest_asyncio

from envoy_extproc.envoy_process import free_port
from router.config import parse_config
from router.emulator.server import EmulatorPod
from router.proxy.app import ProxyApp, RunningServer
from router.sidecar import SidecarApp, SidecarSettings
from tests.security.canary import Canary
from tests.security.conftest import MODEL, POD, assert_clean, attack_chat, record_bodies

pytestmark = pytest.mark.asyncio(loop_scope="module")
HEADER = "x-prefiller-host-port"


@dataclass
class PD:
    prefill: EmulatorPod
    decode: EmulatorPod
    bodies: list[dict[str, Any]]
    #: An allowed prefill pod that refuses connections (its leg always fails).
    dead: str
    static: httpx.AsyncClient
    registry: httpx.AsyncClient
    static_app: SidecarApp

    def last_params(self) -> dict[str, Any]:
        return self.bodies[-1]["kv_transfer_params"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pd() -> AsyncIterator[PD]:
    async with contextlib.AsyncExitStack() as es:
        fast = replace(POD, precise_timers=False)
        prefill = await es.enter_async_context(EmulatorPod(replace(fast, role="prefill")))
        decode = await es.enter_async_context(EmulatorPod(replace(fast, role="decode")))
        dead = f"127.0.0.1:{free_port()}"
        static_app = SidecarApp(
            SidecarSettings(decode=decode.endpoint, allow=(prefill.endpoint, dead))
        )
        static = await es.enter_async_context(RunningServer(static_app))
        router = ProxyApp(
            parse_config(
                f"pods:\n  - {{endpoint: '{prefill.endpoint}', role: prefill, models: [{MODEL}]}}\n"
                f"  - {{endpoint: '{decode.endpoint}', role: decode, models: [{MODEL}]}}\n"
            )
        )
        registry_server = await es.enter_async_context(RunningServer(router))
        by_registry = await es.enter_async_context(
            RunningServer(
                SidecarApp(
                    SidecarSettings(
                        decode=decode.endpoint, registry_url=f"{registry_server.url}/debug/pods"
                    )
                )
            )
        )
        clients = [
            await es.enter_async_context(httpx.AsyncClient(base_url=s.url, timeout=20))
            for s in (static, by_registry)
        ]
        yield PD(prefill, decode, record_bodies(decode), dead, *clients, static_app)


def _two_phase(pd: PD) -> None:
    params = pd.last_params()
    assert params["remote_engine_id"] == pd.prefill.runtime.engine_uuid
    assert f"{params['remote_host']}:{params['remote_port']}" == pd.prefill.side_channel


async def test_sidecar_strips_client_params_without_a_prefill_header(
    pd: PD, canary: Canary
) -> None:
    for stream in (False, True):
        r = await pd.static.post("/v1/chat/completions", json=attack_chat(canary, stream=stream))
        assert r.status_code == 200, r.text
        assert_clean(pd.bodies[-1])
    await canary.assert_untouched()


async def test_sidecar_fallback_after_a_failed_prefill_sends_the_body_without_client_params(
    pd: PD, canary: Canary
) -> None:
    before = len(pd.bodies)
    r = await pd.static.post(
        "/v1/chat/completions", json=attack_chat(canary), headers={HEADER: pd.dead}
    )
    assert r.status_code == 200, r.text
    [got] = pd.bodies[before:]
    assert_clean(got)
    page = pd.static_app.metrics.render().decode()
    assert 'kvroute_sidecar_pd_requests_total{outcome="prefill_failed"}' in page
    await canary.assert_untouched()


async def test_sidecar_two_phase_sets_params_only_from_its_prefill_pod(
    pd: PD, canary: Canary
) -> None:
    r = await pd.static.post(
        "/v1/chat/completions",
        json=attack_chat(canary, "a long document " * 40),
        headers={HEADER: pd.prefill.endpoint},
    )
    assert r.status_code == 200, r.text
    _two_phase(pd)
    assert pd.bodies[-1]["vllm_xargs"] == {"keep_me": 7}
    await canary.assert_untouched()


@pytest.mark.parametrize(
    "spelling",
    ["localhost:{p}", "LOCALHOST.:{p}", "[::1]:{p}", "127.0.0.1:0{p}", "[::ffff:127.0.0.1]:{p}"],
)
async def test_sidecar_allowlist_matches_the_pool_after_normalisation(
    pd: PD, canary: Canary, spelling: str
) -> None:
    port = pd.prefill.endpoint.rsplit(":", 1)[1]
    value = spelling.format(p=port)
    for client in (pd.static, pd.registry):
        before = len(pd.bodies)
        r = await client.post(
            "/v1/chat/completions", json=attack_chat(canary, "norm " * 30), headers={HEADER: value}
        )
        assert r.status_code == 200, (value, r.text)
        assert len(pd.bodies) == before + 1
        _two_phase(pd)
    await canary.assert_untouched()


@pytest.mark.parametrize(
    "spelling",
    [
        "{c}",
        "localhost:{cp}",
        "LocalHost.:{cp}",
        "[::1]:{cp}",
        "[::ffff:127.0.0.1]:{cp}",
        "2130706433:{cp}",
        "127.0.0.1:{cp}/v1",
        "user@{c}",
        "{prefill}@{c}",
        "{decode}",
    ],
)
async def test_sidecar_refuses_prefill_hosts_outside_the_pool(
    pd: PD, canary: Canary, spelling: str
) -> None:
    value = spelling.format(
        c=canary.endpoint,
        cp=canary.port,
        prefill=pd.prefill.endpoint,
        decode=pd.decode.endpoint,
    )
    before = len(pd.bodies)
    for client in (pd.static, pd.registry):
        r = await client.post(
            "/v1/chat/completions", json=attack_chat(canary), headers={HEADER: value}
        )
        assert r.status_code == 403, (value, r.status_code, r.text)
        assert r.headers["x-kvroute-error"] == "prefill_target_not_allowed"
        assert r.json()["error"]["code"] == 403
    assert len(pd.bodies) == before
    await canary.assert_untouched()


async def test_sidecar_refuses_repeated_prefill_headers(pd: PD, canary: Canary) -> None:
    before = len(pd.bodies)
    for headers in (
        [(HEADER, pd.prefill.endpoint), (HEADER, canary.endpoint)],
        [(HEADER, canary.endpoint), (HEADER, pd.prefill.endpoint)],
        [(HEADER, f"{pd.prefill.endpoint},{canary.endpoint}")],
        [(HEADER, pd.prefill.endpoint), (HEADER, pd.prefill.endpoint)],
    ):
        r = await pd.static.post("/v1/chat/completions", json=attack_chat(canary), headers=headers)
        assert r.status_code == 400, (headers, r.status_code, r.text)
        assert r.headers["x-kvroute-error"] == "prefill_target_repeated"
        assert r.json()["error"]["code"] == 400
    assert len(pd.bodies) == before
    await canary.assert_untouched()
