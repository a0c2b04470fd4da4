"""The per-model admission queue: bounds, hand-over order, shedding, cancellation."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.proxy.admission import AdmissionQueue
from router.request import RequestError


async def test_waiters_get_freed_slots_in_arrival_order():
    q = AdmissionQueue(max_inflight=1, max_queued=5, queue_timeout_s=5)
    await q.acquire("m", sheddable=False)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await q.acquire("m", sheddable=False)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert q.queued("m") == 3
    for _ in range(3):
        q.release("m")
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and q.inflight("m") == 1


async def test_models_are_admitted_independently():
    q = AdmissionQueue(max_inflight=1, max_queued=0, queue_timeout_s=5)
    await q.acquire("a", sheddable=False)
    await q.acquire("b", sheddable=False)
    with pytest.raises(RequestError) as e:
        await q.acquire("a", sheddable=False)
    assert e.value.status == 429 and e.value.code == "queue_full"


async def test_queue_timeout_is_429_and_frees_the_place():
    q = AdmissionQueue(max_inflight=1, max_queued=1, queue_timeout_s=0.05)
    await q.acquire("m", sheddable=False)
    with pytest.raises(RequestError) as e:
        await q.acquire("m", sheddable=False)
    assert e.value.code == "queue_timeout" and q.queued("m") == 0


async def test_cancelled_waiter_leaves_the_queue_without_taking_a_slot():
    q = AdmissionQueue(max_inflight=1, max_queued=2, queue_timeout_s=5)
    await q.acquire("m", sheddable=False)
    t = asyncio.create_task(q.acquire("m", sheddable=False))
    await asyncio.sleep(0)
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    assert q.queued("m") == 0
    q.release("m")
    assert q.inflight("m") == 0


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(1, 4),
    queued=st.integers(0, 4),
    ops=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=30),
)
def test_inflight_never_exceeds_the_limit_and_every_slot_comes_back(limit, queued, ops):
    """ops: (arrive or finish, sheddable)."""

    async def scenario() -> None:
        q = AdmissionQueue(max_inflight=limit, max_queued=queued, queue_timeout_s=5)
        holders: list[asyncio.Task[None]] = []
        admitted = 0

        async def request(shed: bool) -> None:
            nonlocal admitted
            await q.acquire("m", sheddable=shed)
            admitted += 1

        for arrive, shed in ops:
            if arrive:
                holders.append(asyncio.create_task(request(shed)))
            elif admitted:
                q.release("m")
                admitted -= 1
            await asyncio.sleep(0)
            assert q.inflight("m") <= limit
            assert q.queued("m") <= queued
        # Finish everything: each release hands the slot to the next waiter, if any.
        while not all(t.done() for t in holders) or admitted:
            if admitted:
                q.release("m")
                admitted -= 1
            await asyncio.sleep(0)
            assert q.inflight("m") <= limit
        await asyncio.gather(*holders, return_exceptions=True)
        assert q.inflight("m") == 0 and q.queued("m") == 0

    asyncio.run(scenario())
