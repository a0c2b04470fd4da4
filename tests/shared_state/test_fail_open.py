"""Fail open, through a real `kvroute proxy` app: the store unreachable at start, or killed and
restarted mid-run, fails no request; state resyncs when the store returns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from router.proxy.app import ProxyApp, RunningServer
from router.request import RoutingRequest
from tests.proxy.conftest import TEST_SETTINGS, FakePod, fleet_config
from tests.shared_state.conftest import RedisServer, free_port, wait_for


def shared_yaml(url: str, prefix: str) -> str:
    return (
        "prefix_index: {mode: approximate}\n"
        f"shared_state: {{url: '{url}', prefix: {prefix}, lease_s: 2.0, heartbeat_s: 0.2, "
        "retry_s: 0.2, op_timeout_s: 0.3, connect_timeout_s: 0.3}\n"
    )


@asynccontextmanager
async def proxy(
    pods: list[FakePod], url: str, prefix: str
) -> AsyncIterator[tuple[ProxyApp, httpx.AsyncClient]]:
    app = ProxyApp(fleet_config(pods, extra_yaml=shared_yaml(url, prefix)), TEST_SETTINGS)
    async with (
        RunningServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10.0) as client,
    ):
        yield app, client


@pytest.fixture
async def pods() -> AsyncIterator[list[FakePod]]:
    started = [await FakePod().start() for _ in range(3)]
    yield started
    for p in started:
        await p.stop()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def body(i: int, conversation: int) -> dict[str, object]:
    return {"model": "m", "prompt": f"conversation {conversation} history " * 20 + f"turn {i}",
            "max_tokens": 2}  # fmt: skip


async def test_unreachable_store_at_start_is_a_warning_not_a_failure(
    pods: list[FakePod], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="router.shared_state.redis_sync"):
        async with proxy(pods, url, prefix) as (_app, client):
            for i in range(5):
                r = await client.post("/v1/completions", json=body(i, 1))
                assert r.status_code == 200
            await asyncio.sleep(0.5)  # a few retries
            page = (await client.get("/metrics")).text
    warnings = [r for r in caplog.records if "unreachable at start" in r.getMessage()]
    assert len(warnings) == 1, "logged once, not once per retry"
    assert url in warnings[0].getMessage()
    assert metric(page, "kvroute_shared_state_up") == 0
    assert metric(page, "kvroute_shared_state_errors_total") >= 2
    assert "kvroute_shared_state_lag_seconds" in page


async def test_store_killed_and_restarted_mid_run_fails_no_request_and_resyncs(
    pods: list[FakePod], redis: RedisServer, prefix: str
) -> None:
    async with (
        proxy(pods, redis.url, prefix) as (a, ca),
        proxy(pods, redis.url, prefix) as (b, cb),
    ):
        assert a.shared_state is not None and b.shared_state is not None
        statuses: list[int] = []
        stop = asyncio.Event()

        async def load(client: httpx.AsyncClient, conversation: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = await client.post("/v1/completions", json=body(i, conversation))
                    statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(-1)
                i += 1
                await asyncio.sleep(0.01)

        clients = [asyncio.create_task(load(c, n)) for n, c in enumerate((ca, cb, ca, cb))]
        try:
            await asyncio.sleep(0.5)
            redis.kill()
            await wait_for(lambda: not a.shared_state.up and not b.shared_state.up, 3.0, "down")
            await asyncio.sleep(1.0)  # routing on local state meanwhile
            down_count = len(statuses)
            redis.start()
            back = time.monotonic()
            await wait_for(lambda: a.shared_state.up and b.shared_state.up, 3.0, "store back")
            # Resynced: a conversation only A has seen since the restart shows in B's index.
            r = await ca.post("/v1/completions", json=body(0, 99))
            assert r.status_code == 200
            prompt = str(body(0, 99)["prompt"])
            keys = a.scheduler.keyer.keys(RoutingRequest(model="m", prompt=prompt))
            await wait_for(
                lambda: len(b.scheduler.approx_index.longest_prefix(keys)) > 0, 3.0, "resync"
            )
            resync_s = time.monotonic() - back
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert len(statuses) > down_count > 0
        assert statuses.count(200) == len(statuses), (
            f"failed: {len(statuses) - statuses.count(200)}"
        )
        # A connection the restart broke may fail once more and be reopened: up again at once.
        await wait_for(lambda: b.shared_state.up, 3.0, "up after the restart")
        page = (await cb.get("/metrics")).text
        assert metric(page, "kvroute_shared_state_up") == 1
        assert metric(page, "kvroute_shared_state_errors_total") >= 1
        print(f"{len(statuses)} requests, 0 failed; resynced {resync_s:.2f} s after the restart")
        assert resync_s < 3.0
