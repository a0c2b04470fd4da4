"""SharedState: one replica's side of the shared state, without I/O.

Owns two things. (1) What this replica publishes: it is the scheduler's `StateObserver`, so
every hook's change (approximate-index insert or removal, pending insert, in-flight charge)
lands here; `take_batch` turns the changes since the last call into one `wire.Batch`, and
`snapshot` gives this replica's full charge totals. (2) What the other replicas did: `apply_batch`
and `apply_snapshot` write their index inserts into the scheduler's indexes (index methods,
never the hooks, so nothing is published back) and fold their charge totals into the pods'
in-flight counts (`Scheduler.add_remote_inflight`). A replica not heard from for `lease_s`
(no snapshot, no batch: it died, or the store is gone) has its charges dropped by `expire`.

The transport (`redis_sync`) calls these from the scheduler's event loop; nothing here blocks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.pods import Pod
from router.scheduler import Scheduler
from router.shared_state.settings import SharedStateSettings
from router.shared_state.wire import Batch, Charge, KeysOp, Snapshot, charge_of

_INDEXED, _UNINDEXED, _PENDING = 0, 1, 2
_ZERO: Charge = (0, 0, 0)


@dataclass(slots=True)
class _Remote:
    """What one other replica has in flight, per pod, and when we last heard of it."""

    charges: dict[str, Charge] = field(default_factory=dict)
    #: Pod → the sender's `seq` of the total we hold (older totals are ignored).
    seqs: dict[str, int] = field(default_factory=dict)
    #: Newest snapshot `seq` applied (a pod absent from it is zero as of then).
    snapshot_seq: int = 0
    last_heard: float = 0.0


class SharedState:
    def __init__(
        self,
        scheduler: Scheduler,
        replica_id: str,
        settings: SharedStateSettings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.scheduler = scheduler
        self.replica_id = replica_id
        self.settings = settings
        self.clock = clock
        self.wall = wall
        #: This replica's own in-flight totals per pod (requests, tokens, prefilling).
        self.own: dict[str, list[int]] = {}
        self.seq = 0
        self._ops: deque[tuple[int, str, Sequence[int]]] = deque(maxlen=settings.backlog_max)
        self._dirty: set[str] = set()
        #: Changes lost because the backlog was full (the store was down a long time).
        self.dropped = 0
        #: Called when a change is queued (the transport's wake-up); None = nobody listens.
        self.on_change: Callable[[], None] | None = None
        self.remote: dict[str, _Remote] = {}
        #: Pod → (pod object, remote totals) folded into it.
        self._applied: dict[str, tuple[Pod | None, Charge]] = {}

    # ------------------------------------------------------------------ StateObserver
    def charged(self, pod: str, requests: int, tokens: int, prefilling: int = 0) -> None:
        tot = self.own.get(pod)
        if tot is None:
            tot = self.own[pod] = [0, 0, 0]
        tot[0] = max(0, tot[0] + requests)
        tot[1] = max(0, tot[1] + tokens)
        tot[2] = max(0, tot[2] + prefilling)
        self.seq += 1
        self._dirty.add(pod)
        self._changed()

    def indexed(self, pod: str, keys: Sequence[int]) -> None:
        self._queue(_INDEXED, pod, keys)

    def unindexed(self, pod: str, keys: Sequence[int]) -> None:
        self._queue(_UNINDEXED, pod, keys)

    def pending(self, pod: str, keys: Sequence[int]) -> None:
        self._queue(_PENDING, pod, keys)

    def _queue(self, kind: int, pod: str, keys: Sequence[int]) -> None:
        ops = self._ops
        if len(ops) == ops.maxlen:
            self.dropped += 1
        ops.append((kind, pod, keys))
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # ------------------------------------------------------------------ publishing
    @property
    def has_changes(self) -> bool:
        return bool(self._ops or self._dirty)

    def take_batch(self, max_ops: int = 512) -> Batch | None:
        """The changes queued since the last batch (at most `max_ops` index operations), or
        None when there are none."""
        if not self.has_changes:
            return None
        lists: tuple[list[KeysOp], list[KeysOp], list[KeysOp]] = ([], [], [])
        ops = self._ops
        for _ in range(min(max_ops, len(ops))):
            kind, pod, keys = ops.popleft()
            lists[kind].append(KeysOp(pod, list(keys)))
        charges = {pod: self._total(pod) for pod in self._dirty}
        self._dirty.clear()
        return Batch(self.replica_id, self.seq, self.wall(), *lists, charges)

    def requeue(self, batch: Batch) -> None:
        """Put back a batch the store did not take (it is sent again, first, on return)."""
        ops = self._ops
        for kind, items in ((_PENDING, batch.pending), (_UNINDEXED, batch.unindexed)):
            for op in reversed(items):
                ops.appendleft((kind, op.pod, op.keys))
        for op in reversed(batch.indexed):
            ops.appendleft((_INDEXED, op.pod, op.keys))
        self._dirty.update(batch.charges)

    def snapshot(self) -> Snapshot:
        charges = {pod: (t[0], t[1], t[2]) for pod, t in self.own.items() if any(t)}
        return Snapshot(self.replica_id, self.seq, self.wall(), charges)

    def _total(self, pod: str) -> Charge:
        t = self.own.get(pod)
        return (t[0], t[1], t[2]) if t is not None else _ZERO

    # ------------------------------------------------------------------ applying
    def apply_batch(self, batch: Batch) -> bool:
        """Apply another replica's batch; False for this replica's own (ignored)."""
        if batch.replica == self.replica_id:
            return False
        sched = self.scheduler
        registry = sched.registry
        now = sched.clock()
        if batch.indexed and sched.records_approx:
            approx = sched.approx_index
            for op in batch.indexed:
                if op.pod in registry:
                    approx.add_blocks(op.pod, op.keys, now=now)
        if batch.unindexed and sched.records_approx:
            for op in batch.unindexed:
                sched.approx_index.remove_keys(op.pod, op.keys)
        if batch.pending and sched.records_pending:
            until = now + self.settings.remote_pending_s
            for op in batch.pending:
                if op.pod in registry:
                    sched.precise_index.add_pending(op.pod, op.keys, until)
        if batch.charges and batch.sent_at >= self.wall() - self.settings.lease_s:
            # Older than a lease: the sender's charges may have expired here already.
            remote = self._remote(batch.replica)
            for pod, total in batch.charges.items():
                if batch.seq > remote.seqs.get(pod, 0) and batch.seq > remote.snapshot_seq:
                    remote.seqs[pod] = batch.seq
                    self._set_charge(remote, pod, charge_of(total))
        return True

    def apply_snapshot(self, snap: Snapshot, age_s: float = 0.0) -> None:
        """Apply another replica's heartbeat, written `age_s` ago: it was alive then, and
        these are its totals."""
        if snap.replica == self.replica_id:
            return
        remote = self._remote(snap.replica, self.clock() - age_s)
        if snap.seq > remote.snapshot_seq:
            remote.snapshot_seq = snap.seq
            for pod in set(remote.charges) | set(snap.charges):
                if snap.seq > remote.seqs.get(pod, 0):
                    remote.seqs[pod] = snap.seq
                    self._set_charge(remote, pod, charge_of(snap.charges.get(pod, _ZERO)))

    def expire(self) -> list[str]:
        """Drop the charges of replicas not heard from for `lease_s`; returns their ids."""
        cutoff = self.clock() - self.settings.lease_s
        gone = [rid for rid, r in self.remote.items() if r.last_heard < cutoff]
        for rid in gone:
            remote = self.remote.pop(rid)
            for pod in list(remote.charges):
                self._set_charge(remote, pod, _ZERO)
        return gone

    def remote_charges(self, pod: str) -> Charge:
        """The other replicas' in-flight (requests, tokens, prefilling) on `pod`, as applied
        here."""
        r = t = f = 0
        for remote in self.remote.values():
            c = remote.charges.get(pod)
            if c is not None:
                r += c[0]
                t += c[1]
                f += c[2]
        return r, t, f

    def _remote(self, replica: str, heard_at: float | None = None) -> _Remote:
        at = self.clock() if heard_at is None else heard_at
        remote = self.remote.get(replica)
        if remote is None:
            remote = self.remote[replica] = _Remote(last_heard=at)
        remote.last_heard = max(remote.last_heard, at)
        return remote

    def _set_charge(self, remote: _Remote, pod: str, total: Charge) -> None:
        if any(total):
            remote.charges[pod] = total
        else:
            remote.charges.pop(pod, None)
        self._fold(pod)

    def _fold(self, pod: str) -> None:
        """Make `pod`'s in-flight counts carry the remote totals now held (the delta against
        what was folded in before, unless the pod was replaced meanwhile)."""
        want = self.remote_charges(pod)
        obj = self.scheduler.registry.get(pod)
        prev = self._applied.get(pod)
        have = prev[1] if prev is not None and prev[0] is obj else _ZERO
        if obj is not None and want != have:
            self.scheduler.add_remote_inflight(
                pod, want[0] - have[0], want[1] - have[1], want[2] - have[2]
            )
        if any(want):
            self._applied[pod] = (obj, want)
        else:
            self._applied.pop(pod, None)
