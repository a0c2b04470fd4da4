"""`kvroute serve` (the ext_proc picker) wires the shared state in: started and stopped with
the server, its figures on the metrics port, a clean stop frees its charges at once."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from envoy_extproc.server import PickerServer
from router.request import RoutingRequest
from tests.proxy.conftest import FakePod
from tests.shared_state.conftest import RedisServer, replica_config, wait_for

#: Bound on applying another replica's change (loopback: milliseconds; generous for a loaded
#: CI machine, where the whole suite shares 2 cores with two real vLLM engines).
APPLY_BOUND_S = 5.0


@pytest.fixture
async def pods() -> AsyncIterator[list[str]]:
    started = [await FakePod().start() for _ in range(2)]
    yield [p.endpoint for p in started]
    for p in started:
        await p.stop()


@asynccontextmanager
async def picker(pods: list[str], url: str, prefix: str) -> AsyncIterator[PickerServer]:
    config = replica_config(pods, url, prefix, lease_s=30.0)
    settings = dataclasses.replace(
        config.extproc, host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0
    )
    server = PickerServer(config, settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_two_pickers_share_charges_and_export_the_figures(
    pods: list[str], redis: RedisServer, prefix: str
) -> None:
    async with picker(pods, redis.url, prefix) as a:
        async with picker(pods, redis.url, prefix) as b:
            sched = a.scheduler
            d = sched.schedule(RoutingRequest(model="m", prompt="picker prompt " * 10))
            sched.on_pick(d)
            pod = b.registry[d.target]
            await wait_for(lambda: pod.inflight_requests == 1, APPLY_BOUND_S, "A's charge in B")
            assert b.ports is not None
            async with httpx.AsyncClient() as client:
                page = (await client.get(f"http://127.0.0.1:{b.ports.metrics}/metrics")).text
            assert metric(page, "kvroute_shared_state_up") == 1
            assert metric(page, "kvroute_shared_state_errors_total") == 0
            assert metric(page, "kvroute_shared_state_replicas") == 1
            assert 0 <= metric(page, "kvroute_shared_state_lag_seconds") < APPLY_BOUND_S
            async with picker(pods, redis.url, prefix) as c:
                await wait_for(
                    lambda: c.registry[d.target].inflight_requests == 1, APPLY_BOUND_S, "catch-up"
                )
        # B stopped cleanly; A's charge is still A's: B's stop did not take it away.
        assert a.registry[d.target].inflight_requests == 1
    # A stopped cleanly (lease 30 s): its snapshot key is deleted, not left to expire.
    async with picker(pods, redis.url, prefix) as late:
        await wait_for(
            lambda: late.shared_state is not None and late.shared_state.up, APPLY_BOUND_S, "up"
        )
        assert late.registry[d.target].inflight_requests == 0
        assert late.shared_state is not None and late.shared_state.replicas == 0
