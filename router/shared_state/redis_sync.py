"""RedisSync: carries `SharedState` between replicas through Redis (or Valkey), failing open.

Keys (all under `prefix`):
- `{prefix}:changes`, a stream capped near `stream_maxlen` entries; each entry's field `m` is
  one msgpack `wire.Batch`. Every replica XADDs its batches (a writer task woken by the
  scheduler's hooks, so a change leaves within about a millisecond) and XREADs everyone's
  (a reader task blocked on the stream). A joining replica reads it from the start: the
  capped stream is its catch-up of the index inserts.
- `{prefix}:replica:{id}`, one per replica: a msgpack `wire.Snapshot` of its charge totals,
  rewritten every `heartbeat_s` with a TTL of `lease_s`. It is the heartbeat, the charge
  snapshot joiners read, and the lease: each heartbeat also reads every replica's key, and a
  replica whose key stayed away for `lease_s` (SIGKILL) has its charges dropped here.

Fail open: routing never waits for the store. A command that fails or exceeds
`op_timeout_s` marks the store down (logged once per outage, counted in `errors`); the replica
keeps routing on its local state, holds its own changes (up to `backlog_max`), retries every
`retry_s`, and on return resyncs: republishes the held changes and its snapshot, and reads
the stream from where it stopped (from the start when the store came back empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from router.scheduler import Scheduler
from router.shared_state.settings import SharedStateSettings
from router.shared_state.state import SharedState
from router.shared_state.wire import decode_batch, decode_snapshot, encode

log = logging.getLogger(__name__)

_READ_BLOCK_MS = 1000
_STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError, ValueError)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, n = text.partition("-")
    return int(ms), int(n or 0)


class RedisSync:
    """Start it in the scheduler's event loop (`start`), stop it at shutdown (`stop`)."""

    def __init__(self, scheduler: Scheduler, settings: SharedStateSettings) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id or default_replica_id()
        self.state = SharedState(scheduler, self.replica_id, settings)
        self.stream_key = f"{settings.prefix}:changes"
        self.replica_prefix = f"{settings.prefix}:replica:"
        #: 1 while the store answers (the `kvroute_shared_state_up` gauge).
        self.up = False
        #: Failed store operations and outages (`kvroute_shared_state_errors_total`).
        self.errors = 0
        #: Seconds between another replica taking its newest applied batch and us applying it.
        self.lag_s = 0.0
        self.batches_sent = 0
        self.batches_applied = 0
        self._last_id = "0-0"
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Set by `stop`: no heartbeat may renew the lease after it (a task left behind by a
        #: stuck store command would otherwise write our key back after its deletion).
        self._closing = False
        self._down_since: float | None = None
        self._client = self._make_client(settings.op_timeout_s)
        # XREAD blocks server-side; its socket must wait longer than the block.
        self._reader = self._make_client(settings.op_timeout_s + _READ_BLOCK_MS / 1000)
        self.state.on_change = self._wake.set
        scheduler.observer = self.state

    def _make_client(self, timeout_s: float) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.settings.url,
            socket_connect_timeout=self.settings.connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )

    @property
    def replicas(self) -> int:
        """Other replicas whose charges are held here now."""
        return len(self.state.remote)

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        """Connect and catch up, or warn once and go on (the store is not needed to route)."""
        try:
            await self._connect()
        except _STORE_ERRORS as e:
            self._went_down(e, at_start=True)
        self._tasks = [
            asyncio.create_task(self._supervise(), name="shared-state"),
            asyncio.create_task(self._expire_loop(), name="shared-state-leases"),
        ]

    async def stop(self) -> None:
        """Stop the loops and free this replica's charges at once (a clean exit does not
        wait for the lease). Bounded: a store that hangs cannot hold the face's shutdown."""
        bound = max(1.0, 2 * self.settings.op_timeout_s)
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            _done, stuck = await asyncio.wait(self._tasks, timeout=bound + _READ_BLOCK_MS / 1000)
            if stuck:
                log.warning("shared state: %d store task(s) did not stop; left behind", len(stuck))
        self._tasks = []
        # Whatever `up` says (a task that did not stop may have marked the link down on its
        # way out): flush and free our charges, bounded; with the store really gone, each
        # attempt fails within its timeout.
        with contextlib.suppress(*_STORE_ERRORS):
            await asyncio.wait_for(self._flush(), bound)
        with contextlib.suppress(*_STORE_ERRORS):
            await asyncio.wait_for(
                self._client.delete(self.replica_prefix + self.replica_id), bound
            )
        for c in (self._client, self._reader):
            with contextlib.suppress(*_STORE_ERRORS):
                await asyncio.wait_for(c.aclose(), bound)
        self.up = False

    async def _supervise(self) -> None:
        while True:
            if not self.up:
                await asyncio.sleep(self.settings.retry_s)
                try:
                    await self._connect()
                except _STORE_ERRORS as e:
                    self._count_error(e)
                    continue
            workers = [
                asyncio.create_task(self._read_loop()),
                asyncio.create_task(self._write_loop()),
                asyncio.create_task(self._heartbeat_loop()),
            ]
            try:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
                err = next(t.exception() for t in done if t.exception() is not None)
            finally:
                await self._stop_workers(workers)
            if not isinstance(err, _STORE_ERRORS):
                raise err
            self._went_down(err)

    async def _stop_workers(self, workers: list[asyncio.Task[None]]) -> None:
        """Cancel the loops and wait for them. redis-py does not give up a blocking XREAD
        when its task is cancelled (the task then waits forever), so a reader still running
        after a moment has its socket closed under it, which ends the read with an error."""
        for w in workers:
            w.cancel()
        _done, stuck = await asyncio.wait(workers, timeout=0.2)
        if stuck:
            with contextlib.suppress(*_STORE_ERRORS):
                await self._reader.connection_pool.disconnect()
            _done, stuck = await asyncio.wait(stuck, timeout=2.0)
        if stuck:
            # Still blocked (seen under heavy load): close the reader's client outright, so no
            # task outlives the stop (an event loop closing would wait on it forever).
            log.warning("shared state: a store read did not end on stop; closing its client")
            with contextlib.suppress(*_STORE_ERRORS):
                await self._reader.aclose()
            await asyncio.wait(stuck, timeout=2.0)
        for w in workers:
            if w.done() and not w.cancelled():
                w.exception()  # retrieved: the supervisor already judged the first one

    async def _connect(self) -> None:
        await self._client.ping()
        if self._last_id != "0-0":
            tip = await self._client.xrevrange(self.stream_key, count=1)
            if not tip or _stream_id(tip[0][0]) < _stream_id(self._last_id):
                self._last_id = "0-0"  # the store came back empty: read what is there now
        await self._heartbeat()
        await self._flush()
        if self._down_since is not None:
            log.warning(
                "shared state: store %s is back after %.1f s; resynced",
                self.settings.url,
                time.monotonic() - self._down_since,
            )
        self._down_since = None
        self.up = True

    # ------------------------------------------------------------------ loops
    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0.001)  # let a burst of picks share one entry
            await self._flush()

    async def _flush(self) -> None:
        state = self.state
        while state.has_changes:
            batch = state.take_batch()
            if batch is None:
                return
            try:
                await self._client.xadd(
                    self.stream_key,
                    {"m": encode(batch)},
                    maxlen=self.settings.stream_maxlen,
                    approximate=True,
                )
            except BaseException:
                state.requeue(batch)
                raise
            self.batches_sent += 1

    async def _read_loop(self) -> None:
        state = self.state
        while True:
            reply = await self._reader.xread(
                {self.stream_key: self._last_id}, count=256, block=_READ_BLOCK_MS
            )
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    data = fields.get(b"m")
                    if data is None:
                        continue
                    try:
                        batch = decode_batch(data)
                    except ValueError:
                        self.errors += 1
                        continue
                    if state.apply_batch(batch):
                        self.batches_applied += 1
                        self.lag_s = max(0.0, state.wall() - batch.sent_at)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        """Renew our lease with our totals; read every replica's (they are alive)."""
        if self._closing:
            return
        c = self._client
        own = self.replica_prefix + self.replica_id
        await c.set(own, encode(self.state.snapshot()), px=int(self.settings.lease_s * 1000))
        keys = [k async for k in c.scan_iter(match=self.replica_prefix + "*", count=500)]
        if not keys:
            return
        pipe = c.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = await pipe.execute()
        lease_ms = self.settings.lease_s * 1000
        for data, ttl_ms in zip(replies[::2], replies[1::2], strict=True):
            if data is None or ttl_ms is None or ttl_ms < 0:
                continue
            try:
                snap = decode_snapshot(data)
            except ValueError:
                self.errors += 1
                continue
            # The key's remaining TTL dates the heartbeat on the store's clock, not ours.
            self.state.apply_snapshot(snap, age_s=max(0.0, lease_ms - ttl_ms) / 1000)

    async def _expire_loop(self) -> None:
        """Leases run out on local time, so they expire with the store down too."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for rid in self.state.expire():
                log.info(
                    "shared state: replica %s silent for %.1f s; its charges dropped",
                    rid,
                    self.settings.lease_s,
                )

    # ------------------------------------------------------------------ errors
    def _count_error(self, _e: BaseException) -> None:
        self.errors += 1

    def _went_down(self, e: BaseException, at_start: bool = False) -> None:
        self.errors += 1
        self.up = False
        if self._down_since is None:
            self._down_since = time.monotonic()
            what = "unreachable at start" if at_start else "unreachable"
            log.warning(
                "shared state: store %s %s (%s: %s); routing on this replica's local state, "
                "retrying every %.1f s",
                self.settings.url,
                what,
                type(e).__name__,
                e,
                self.settings.retry_s,
            )
