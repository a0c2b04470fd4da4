"""What replicas write to the store: change batches (a Redis stream) and charge snapshots
(one key per replica, with a TTL: the replica's heartbeat and lease).

Charges travel as absolute totals of the sender's own in-flight accounting per pod, stamped
with the sender's change counter `seq`, never as deltas: a lost or replayed message then
cannot make the count drift, and a newer total simply replaces an older one.
"""

from __future__ import annotations

import msgspec


class KeysOp(msgspec.Struct, array_like=True, frozen=True):
    pod: str
    #: Chained block keys (unsigned 64-bit), in prompt order.
    keys: list[int]


class Batch(msgspec.Struct, array_like=True, frozen=True):
    """One replica's changes since its previous batch."""

    replica: str
    #: The sender's change counter when the batch was taken (orders `charges`).
    seq: int
    #: Sender's wall clock (seconds) when the batch was taken: the receivers' lag.
    sent_at: float
    #: Approximate-index inserts (the sender's picks).
    indexed: list[KeysOp] = []
    #: Approximate-index removals (requests that failed on that pod).
    unindexed: list[KeysOp] = []
    #: Precise-index speculative (pending) inserts.
    pending: list[KeysOp] = []
    #: Pod → the sender's in-flight totals there now (`Charge`), for the pods whose totals
    #: changed.
    charges: dict[str, tuple[int, ...]] = {}


class Snapshot(msgspec.Struct, array_like=True, frozen=True):
    """Every pod's total of one replica (pods absent: zero), refreshed each heartbeat."""

    replica: str
    seq: int
    sent_at: float
    charges: dict[str, tuple[int, ...]] = {}


#: In-flight totals on one pod: (requests, uncached prefill tokens, requests that have not
#: reached their first token). A replica of an older release sends the first two only.
Charge = tuple[int, int, int]


def charge_of(total: tuple[int, ...]) -> Charge:
    """A received total as a `Charge` (missing trailing counts are 0)."""
    padded = (*total[:3], 0, 0, 0)
    return (padded[0], padded[1], padded[2])


_enc = msgspec.msgpack.Encoder()
_batch = msgspec.msgpack.Decoder(Batch)
_snapshot = msgspec.msgpack.Decoder(Snapshot)


def encode(msg: Batch | Snapshot) -> bytes:
    return _enc.encode(msg)


def decode_batch(data: bytes) -> Batch:
    return _batch.decode(data)


def decode_snapshot(data: bytes) -> Snapshot:
    return _snapshot.decode(data)
