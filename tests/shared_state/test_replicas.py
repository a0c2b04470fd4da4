"""Two or more replicas on one real Redis see each other's picks and in-flight charges.

Schedulers run in this process (each with its own `RedisSync`, as in two router processes);
the SIGKILL test runs a replica in a subprocess so it can die without cleaning up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from router.index import BlockIndex
from router.request import RoutingRequest
from router.scheduler import Scheduler
from router.shared_state.redis_sync import RedisSync
from router.shared_state.wire import Batch, charge_of, decode_batch, encode
from tests.shared_state.conftest import RedisServer, replica_config, wait_for

PODS = ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"]
#: Applying another replica's change: the stream read is pushed, so well under this.
APPLY_BOUND_S = 0.5


def req(prompt: str) -> RoutingRequest:
    return RoutingRequest(model="m", prompt=prompt, segments=(prompt,))


@asynccontextmanager
async def replica(
    url: str, prefix: str, mode: str = "approximate", lease_s: float = 1.5
) -> AsyncIterator[tuple[Scheduler, RedisSync]]:
    config = replica_config(PODS, url, prefix, mode=mode, lease_s=lease_s)
    precise = BlockIndex() if mode == "precise" else None
    sched = Scheduler(config, precise_index=precise)
    assert config.shared_state is not None
    sync = RedisSync(sched, config.shared_state)
    await sync.start()
    try:
        yield sched, sync
    finally:
        await sync.stop()


def inflight(sched: Scheduler) -> dict[str, tuple[int, int, int]]:
    """Pod → (requests, uncached prefill tokens, requests before their first token)."""
    return {
        p.endpoint: (p.inflight_requests, p.inflight_prefill_tokens, p.inflight_prefilling)
        for p in sched.registry.all()
    }


async def test_picks_and_charges_reach_the_other_replica(redis: RedisServer, prefix: str) -> None:
    async with replica(redis.url, prefix) as (a, sync_a), replica(redis.url, prefix) as (b, _):
        assert sync_a.up
        r = req("a long shared system prompt, then the user's question " * 4)
        d = a.schedule(r)
        a.on_pick(d)
        keys = r.block_keys
        assert keys
        took = await wait_for(
            lambda: b.approx_index.longest_prefix(keys).get(d.target) == len(keys),
            APPLY_BOUND_S,
            "the pick in the other replica's approximate index",
        )
        await wait_for(
            lambda: inflight(b)[d.target] == (1, d.uncached_tokens, 1),
            APPLY_BOUND_S,
            "the charge in the other replica",
        )
        # The other replica routes the same prefix to the same pod.
        assert (
            b.schedule(
                req("a long shared system prompt, then the user's question " * 4 + "more")
            ).target
            == d.target
        )
        a.on_first_token(d)
        await wait_for(lambda: inflight(b)[d.target] == (1, 0, 0), APPLY_BOUND_S, "prefill release")
        a.on_complete(d)
        await wait_for(lambda: inflight(b)[d.target] == (0, 0, 0), APPLY_BOUND_S, "completion")
        # Both replicas' own accounting is intact: A counted nothing of B's, B nothing twice.
        assert inflight(a)[d.target] == (0, 0, 0)
        assert sync_a.lag_s == 0.0  # A applied nothing: the only batches were its own
        print(f"pick applied in the other replica after {took * 1000:.1f} ms")


async def test_charges_of_both_replicas_add_up(redis: RedisServer, prefix: str) -> None:
    async with replica(redis.url, prefix) as (a, _), replica(redis.url, prefix) as (b, _):
        da = [a.schedule(req(f"prompt number {i} " * 8)) for i in range(6)]
        db = [b.schedule(req(f"other prompt {i} " * 8)) for i in range(4)]
        for d in da:
            a.on_pick(d)
        for d in db:
            b.on_pick(d)
        want: dict[str, int] = {}
        for d in da + db:
            want[d.target] = want.get(d.target, 0) + 1

        def both_see_all() -> bool:
            return all({ep: v[0] for ep, v in inflight(s).items() if v[0]} == want for s in (a, b))

        await wait_for(both_see_all, APPLY_BOUND_S, "every charge in both replicas")
        for d in da:
            a.on_complete(d)
        for d in db:
            b.on_failure(d, d.target)
        await wait_for(
            lambda: all(v == (0, 0, 0) for s in (a, b) for v in inflight(s).values()),
            APPLY_BOUND_S,
            "every charge released in both replicas",
        )


async def test_pending_inserts_of_the_precise_index_are_shared(
    redis: RedisServer, prefix: str
) -> None:
    async with (
        replica(redis.url, prefix, mode="precise") as (a, _),
        replica(redis.url, prefix, mode="precise") as (b, _),
    ):
        r = req("precise mode prompt with a common prefix " * 3)
        d = a.schedule(r)
        a.on_pick(d)
        keys = r.block_keys
        assert keys
        await wait_for(
            lambda: b.precise_index.longest_prefix(keys).get(d.target) == len(keys),
            APPLY_BOUND_S,
            "the pending insert in the other replica's precise index",
        )
        assert b.precise_index.pending_count(d.target) == len(keys)


async def test_a_replica_that_joins_catches_up(redis: RedisServer, prefix: str) -> None:
    async with replica(redis.url, prefix) as (a, _):
        r = req("what the first replica routed before the second existed " * 2)
        d = a.schedule(r)
        a.on_pick(d)
        keys = r.block_keys
        assert keys
        await asyncio.sleep(0.05)  # published
        async with replica(redis.url, prefix) as (c, _):
            await wait_for(
                lambda: (
                    c.approx_index.longest_prefix(keys).get(d.target) == len(keys)
                    and inflight(c)[d.target][0] == 1
                ),
                1.0,
                "the joiner's catch-up from the stream and the snapshot",
            )


KILLED_REPLICA = textwrap.dedent(
    """
    import asyncio, sys
    from router.request import RoutingRequest
    from router.scheduler import Scheduler
    from router.shared_state.redis_sync import RedisSync
    from tests.shared_state.conftest import replica_config

    async def main():
        pods, url, prefix, n = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])
        sched = Scheduler(replica_config(pods, url, prefix, lease_s=1.5))
        sync = RedisSync(sched, sched.config.shared_state)
        await sync.start()
        for i in range(n):  # a burst that never completes: the process dies mid-burst
            sched.on_pick(sched.schedule(RoutingRequest(model="m", prompt=f"burst {i} " * 9)))
        await asyncio.sleep(0.3)
        print("burst", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_a_killed_replicas_charges_expire_within_the_lease(
    redis: RedisServer, prefix: str
) -> None:
    lease_s = 1.5
    async with replica(redis.url, prefix, lease_s=lease_s) as (b, sync_b):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_REPLICA, ",".join(PODS), redis.url, prefix, "12"],
            stdout=subprocess.PIPE,
            cwd=os.getcwd(),
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line.strip() == b"burst"
            total: Callable[[], int] = lambda: sum(v[0] for v in inflight(b).values())  # noqa: E731
            await wait_for(lambda: total() == 12, 2.0, "the other replica's burst charged here")
            assert sync_b.replicas == 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            took = await wait_for(
                lambda: all(v == (0, 0, 0) for v in inflight(b).values()),
                lease_s + 1.0,
                "the killed replica's charges expired",
            )
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert took <= lease_s + 0.5  # lease + one heartbeat tick of slack
        assert sync_b.replicas == 0
        print(f"charges of the SIGKILLed replica gone {took:.2f} s after the kill")


def test_a_two_count_charge_of_an_older_replica_reads_as_no_prefilling() -> None:
    """Replicas of the previous release send (requests, tokens): a rolling upgrade keeps
    applying their charges, with none of their requests counted as before-first-token."""
    old = Batch("old-replica", 3, 0.0, charges={PODS[0]: (2, 512)})
    assert charge_of(decode_batch(encode(old)).charges[PODS[0]]) == (2, 512, 0)
    assert charge_of((1, 2, 3)) == (1, 2, 3)
