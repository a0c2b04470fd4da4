"""BlockIndex: block key → which pods hold it, and in which tier.

Owns the fleet-wide prefix-cache view. Two writers feed an index: KV events (precise; blocks
arrive with the engine's own hash so `BlockRemoved` can be applied) and the router's own
routing decisions (approximate; bounded per pod by an LRU capacity and an optional TTL).
Each writer keeps its own `BlockIndex` instance.

Layout, chosen for memory and for a cheap longest-prefix walk:
- `_holders[key]` is an int bitmask over pod slots (bit i = the pod in slot i holds the block);
- `_lower_tier[key]` exists only for blocks some pod holds in CPU/disk tier: slot → tier;
- per pod, `_PodBlocks.keys` is an insertion-ordered dict key → last-touch time (LRU order and
  the list to clear), and `_PodBlocks.engine` maps engine hash → key when events gave one.

Bounded mode (capacity/TTL) is meant for the approximate index, which has no engine hashes.

Pending entries (the precise index's speculative inserts): a routing decision is recorded as
`add_pending(pod, keys, expires_at)` the moment it is made, because the prefill it causes is
invisible to KV events until it ran — a burst would otherwise scatter a group across pods. A
pending entry counts as held (GPU tier) in `longest_prefix`, and nowhere else (`holders`,
`pod_block_count`, `__len__` report confirmed blocks only). It leaves when the engine's own
`BlockStored` for that pod and key arrives (`add_blocks` confirms it), when the decision is
released (`release_pending`: the request failed) or when its expiry passes (`expire_pending`).
Each pod counts, per key, how many live decisions hold it pending (`_PodBlocks.pending`), so two
decisions sharing a prefix keep it pending until both are gone.

Silent pods (the precise index's feed health): `mark_silent(pod, True)` says the pod's KV
events stopped arriving while its engine works (`router.feeds`), so its entries here are
stale and incomplete; readers (the scheduler) then complement them with the router's own
record of its picks for that pod until `mark_silent(pod, False)`. The index itself keeps
answering from what it holds.

`longest_prefix` walks the request's key chain AND-ing masks and stops as soon as no pod still
matches, so it costs O(matched blocks + pods that drop out), never O(index).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import islice


class Tier(IntEnum):
    GPU = 0
    CPU = 1
    DISK = 2

    @classmethod
    def from_medium(cls, medium: str | None) -> Tier:
        """Map vLLM's `medium` field (None = GPU) to a tier; unknown media count as disk."""
        if medium is None:
            return cls.GPU
        m = medium.upper()
        if m in ("GPU", "CUDA", "HBM"):
            return cls.GPU
        if m in ("CPU", "DRAM", "HOST"):
            return cls.CPU
        return cls.DISK


DEFAULT_TIER_WEIGHTS: tuple[float, float, float] = (1.0, 0.8, 0.5)


@dataclass(slots=True)
class _PodBlocks:
    slot: int
    keys: dict[int, float] = field(default_factory=dict)
    engine: dict[Hashable, int] = field(default_factory=dict)
    #: Pending (speculative) keys → how many live `PendingEntry`s hold them.
    pending: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class PendingEntry:
    """One decision's speculative insert: `keys` on `pod` until `expires_at`."""

    pod: str
    keys: tuple[int, ...]
    expires_at: float
    live: bool = True
    #: The pod's block set when the entry was made (a pod that left and came back under the
    #: same endpoint has a new one, which an old entry must not touch).
    _owner: _PodBlocks | None = field(default=None, repr=False)


class BlockIndex:
    """Block key → pods (and tiers). Not thread-safe: feed it from one event loop."""

    def __init__(
        self,
        capacity_per_pod: int | None = None,
        ttl_s: float | None = None,
        tier_weights: Sequence[float] = DEFAULT_TIER_WEIGHTS,
    ) -> None:
        self.capacity_per_pod = capacity_per_pod
        self.ttl_s = ttl_s
        self.tier_weights = tuple(float(w) for w in tier_weights)
        self._holders: dict[int, int] = {}
        self._lower_tier: dict[int, dict[int, Tier]] = {}
        self._pods: dict[str, _PodBlocks] = {}
        self._slot_pod: list[str | None] = []
        self._free_slots: list[int] = []
        #: key → bitmask of pods holding it pending (never also set for a confirmed holder).
        self._pending: dict[int, int] = {}
        self._pending_heap: list[tuple[float, int, PendingEntry]] = []
        self._pending_seq = 0
        #: Pods whose KV-event feed is silent (see the module docstring); empty = all fine.
        self.silent_pods: set[str] = set()

    # ----------------------------------------------------------------- pods
    def _pod(self, pod: str) -> _PodBlocks:
        pb = self._pods.get(pod)
        if pb is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._slot_pod[slot] = pod
            else:
                slot = len(self._slot_pod)
                self._slot_pod.append(pod)
            pb = self._pods[pod] = _PodBlocks(slot)
        return pb

    def pods(self) -> list[str]:
        return list(self._pods)

    def mark_silent(self, pod: str, silent: bool) -> None:
        """Record that `pod`'s feed into this index went silent (True) or resumed (False)."""
        if silent:
            self.silent_pods.add(pod)
        else:
            self.silent_pods.discard(pod)

    def pod_block_count(self, pod: str) -> int:
        pb = self._pods.get(pod)
        return len(pb.keys) if pb else 0

    def __len__(self) -> int:
        """Number of distinct block keys held by any pod."""
        return len(self._holders)

    def entry_count(self) -> int:
        """Number of (block, pod) entries."""
        return sum(len(pb.keys) for pb in self._pods.values())

    # ---------------------------------------------------------------- write
    def add_blocks(
        self,
        pod: str,
        keys: Sequence[int],
        engine_hashes: Sequence[Hashable] | None = None,
        tier: Tier = Tier.GPU,
        now: float = 0.0,
    ) -> None:
        """Record that `pod` holds `keys` (in `tier`); re-adding touches them (LRU).

        Keys are touched last-to-first, so a chain's leading blocks are the most recently
        used and a bounded index evicts a chain from its tail, as vLLM does: evicting the head
        first would leave the rest of the chain unmatchable but still taking capacity.
        """
        if engine_hashes is not None and len(engine_hashes) != len(keys):
            raise ValueError("engine_hashes and keys differ in length")
        pb = self._pod(pod)
        bit = 1 << pb.slot
        holders = self._holders
        pkeys = pb.keys
        get = holders.get
        lower = self._lower_tier
        gpu = tier == Tier.GPU
        slot = pb.slot
        if pb.pending:
            self._confirm(pb, keys)
        # A key new to the index stores the pod's `bit` object itself rather than `0 | bit`,
        # a fresh int for slots >= 9: one allocation (and 32 bytes) less per block.
        if gpu and not lower:  # the common case, without the per-key tier checks
            for key in reversed(keys):
                if key in pkeys:  # held already: its bit is set, only its LRU place moves
                    del pkeys[key]
                else:
                    m = get(key)
                    holders[key] = bit if m is None else m | bit
                pkeys[key] = now
        else:
            for key in reversed(keys):
                if key in pkeys:
                    del pkeys[key]
                else:
                    m = get(key)
                    holders[key] = bit if m is None else m | bit
                pkeys[key] = now
                if not gpu:
                    lower.setdefault(key, {})[slot] = tier
                elif lower and key in lower:
                    self._drop_lower_tier(key, slot)
        if engine_hashes is not None:
            pb.engine.update(zip(engine_hashes, keys, strict=True))
        if self.capacity_per_pod is not None:
            excess = len(pkeys) - self.capacity_per_pod
            if excess > 0:
                oldest = [k for k, _ in zip(pkeys, range(excess), strict=False)]
                for key in oldest:
                    self._unlink(pb, key)

    # -------------------------------------------------------------- pending
    def add_pending(self, pod: str, keys: Sequence[int], expires_at: float) -> PendingEntry | None:
        """Record that `pod` will hold `keys` once a routed prefill runs (a speculative insert).

        Keys the pod holds confirmed already are skipped; None when nothing was left to add.
        """
        pb = self._pod(pod)
        pkeys = pb.keys
        todo = tuple(k for k in keys if k not in pkeys)
        if not todo:
            return None
        bit = 1 << pb.slot
        refs = pb.pending
        pending = self._pending
        for key in todo:
            n = refs.get(key, 0)
            if not n:
                pending[key] = pending.get(key, 0) | bit
            refs[key] = n + 1
        entry = PendingEntry(pod, todo, expires_at, _owner=pb)
        self._push_pending(entry)
        return entry

    def set_pending_expiry(self, entry: PendingEntry, expires_at: float) -> None:
        """Move `entry`'s expiry (e.g. shorten it once the prefill ran and events are due)."""
        if not entry.live or expires_at == entry.expires_at:
            return
        earlier = expires_at < entry.expires_at
        entry.expires_at = expires_at
        if earlier:  # the heap holds the later time; a later one is re-pushed when popped
            self._push_pending(entry)

    def release_pending(self, entry: PendingEntry) -> bool:
        """Drop `entry`'s keys that no other live entry holds pending (and no event confirmed).

        False when the entry was released already or its pod left meanwhile."""
        if not entry.live:
            return False
        entry.live = False
        pb = self._pods.get(entry.pod)
        if pb is None or pb is not entry._owner:
            return False
        refs = pb.pending
        pending = self._pending
        clear = ~(1 << pb.slot)
        for key in entry.keys:
            n = refs.get(key)
            if n is None:
                continue  # confirmed by an event meanwhile
            if n > 1:
                refs[key] = n - 1
                continue
            del refs[key]
            m = pending.get(key, 0) & clear
            if m:
                pending[key] = m
            else:
                pending.pop(key, None)
        return True

    def expire_pending(self, now: float) -> int:
        """Release the entries whose expiry is at or before `now`; returns how many."""
        heap = self._pending_heap
        n = 0
        while heap and heap[0][0] <= now:
            at, _, entry = heapq.heappop(heap)
            if not entry.live or at != entry.expires_at:
                if entry.live and entry.expires_at > at:
                    self._push_pending(entry)  # extended meanwhile
                continue
            n += self.release_pending(entry)
        return n

    def pending_count(self, pod: str | None = None) -> int:
        """Pending (pod, key) entries, of one pod or of all."""
        if pod is not None:
            pb = self._pods.get(pod)
            return len(pb.pending) if pb else 0
        return sum(len(pb.pending) for pb in self._pods.values())

    def _push_pending(self, entry: PendingEntry) -> None:
        self._pending_seq += 1
        heapq.heappush(self._pending_heap, (entry.expires_at, self._pending_seq, entry))

    def _confirm(self, pb: _PodBlocks, keys: Iterable[int]) -> None:
        """Events confirmed `keys` on the pod: they stop being pending there."""
        refs = pb.pending
        pending = self._pending
        clear = ~(1 << pb.slot)
        for key in keys:
            if refs.pop(key, None) is not None:
                m = pending.get(key, 0) & clear
                if m:
                    pending[key] = m
                else:
                    pending.pop(key, None)

    def _clear_pending_of(self, pb: _PodBlocks) -> None:
        self._confirm(pb, list(pb.pending))

    def touch(self, pod: str, keys: Sequence[int], now: float) -> None:
        """Mark keys the pod holds as recently used (last-to-first, as `add_blocks`)."""
        pb = self._pods.get(pod)
        if pb is None:
            return
        pkeys = pb.keys
        for key in reversed(keys):
            if key in pkeys:
                del pkeys[key]
                pkeys[key] = now

    def remove_engine_hashes(self, pod: str, engine_hashes: Iterable[Hashable]) -> int:
        """Apply a `BlockRemoved`: drop the blocks the pod reported under these engine hashes.

        Returns how many were known. Unknown hashes are ignored (the block may have been
        stored before we subscribed).
        """
        pb = self._pods.get(pod)
        if pb is None:
            return 0
        n = 0
        for h in engine_hashes:
            key = pb.engine.pop(h, None)
            if key is not None:
                self._unlink(pb, key)
                n += 1
        return n

    def remove_keys(self, pod: str, keys: Iterable[int]) -> None:
        pb = self._pods.get(pod)
        if pb is None:
            return
        for key in keys:
            self._unlink(pb, key)

    def engine_key(self, pod: str, engine_hash: Hashable) -> int | None:
        """Router key the pod's engine hash maps to (for chaining a `BlockStored` parent)."""
        pb = self._pods.get(pod)
        return None if pb is None else pb.engine.get(engine_hash)

    def clear_pod(self, pod: str) -> None:
        """Forget every block of `pod` (AllBlocksCleared, or an unrecoverable event gap)."""
        pb = self._pods.get(pod)
        if pb is None:
            return
        bit = 1 << pb.slot
        holders = self._holders
        for key in pb.keys:
            m = holders.get(key, 0) & ~bit
            if m:
                holders[key] = m
            else:
                holders.pop(key, None)
            if key in self._lower_tier:
                self._drop_lower_tier(key, pb.slot)
        pb.keys.clear()
        pb.engine.clear()

    def drop_pod(self, pod: str) -> None:
        """Clear the pod and free its slot (the pod left the fleet)."""
        self.silent_pods.discard(pod)
        pb = self._pods.get(pod)
        if pb is None:
            return
        self.clear_pod(pod)
        self._clear_pending_of(pb)
        del self._pods[pod]
        self._slot_pod[pb.slot] = None
        self._free_slots.append(pb.slot)

    def expire(self, now: float) -> int:
        """Drop entries not touched for `ttl_s` (oldest first; O(expired))."""
        if self.ttl_s is None:
            return 0
        limit = now - self.ttl_s
        n = 0
        for pb in self._pods.values():
            stale = []
            for key, t in pb.keys.items():
                if t >= limit:
                    break
                stale.append(key)
            for key in stale:
                self._unlink(pb, key)
            n += len(stale)
        return n

    def _unlink(self, pb: _PodBlocks, key: int) -> None:
        if pb.keys.pop(key, None) is None:
            return
        m = self._holders.get(key, 0) & ~(1 << pb.slot)
        if m:
            self._holders[key] = m
        else:
            self._holders.pop(key, None)
        if key in self._lower_tier:
            self._drop_lower_tier(key, pb.slot)

    def _drop_lower_tier(self, key: int, slot: int) -> None:
        tiers = self._lower_tier[key]
        tiers.pop(slot, None)
        if not tiers:
            del self._lower_tier[key]

    # ----------------------------------------------------------------- read
    def holders(self, key: int) -> list[tuple[str, Tier]]:
        """Pods holding `key`, with their tier."""
        mask = self._holders.get(key, 0)
        tiers = self._lower_tier.get(key, {})
        out = []
        while mask:
            low = mask & -mask
            slot = low.bit_length() - 1
            pod = self._slot_pod[slot]
            if pod is not None:
                out.append((pod, tiers.get(slot, Tier.GPU)))
            mask ^= low
        return out

    def longest_prefix(self, keys: Sequence[int]) -> dict[str, float]:
        """Pod → tier-weighted count of the request's leading blocks it holds consecutively.

        A pod absent from the result matched nothing. With only GPU entries the value is the
        plain number of matched blocks.
        """
        holders = self._holders
        lower = self._lower_tier
        slot_pod = self._slot_pod
        result: dict[str, float] = {}
        if not keys:
            return result
        if self._pending:
            return self._longest_prefix_pending(keys)
        alive = holders.get(keys[0], 0)
        if not alive:
            return result
        if not lower:
            return self._longest_prefix_gpu(keys, alive)
        deficit: dict[int, float] | None = None  # slot → weight lost to lower tiers
        i = 0
        n = len(keys)
        while True:
            if lower:
                tiers = lower.get(keys[i])
                if tiers:
                    w = self.tier_weights
                    for slot, tier in tiers.items():
                        if alive >> slot & 1:
                            if deficit is None:
                                deficit = {}
                            deficit[slot] = deficit.get(slot, 0.0) + (1.0 - w[tier])
            i += 1
            nxt = alive & holders.get(keys[i], 0) if i < n else 0
            dropped = alive & ~nxt
            while dropped:
                low = dropped & -dropped
                slot = low.bit_length() - 1
                pod = slot_pod[slot]
                if pod is not None:
                    result[pod] = i - deficit.get(slot, 0.0) if deficit else float(i)
                dropped ^= low
            if not nxt:
                return result
            alive = nxt

    def _longest_prefix_gpu(self, keys: Sequence[int], alive: int) -> dict[str, float]:
        """`longest_prefix` when every entry is in GPU tier: the loop does one dict lookup
        and one AND per block, and only records pods on the blocks where some drop out."""
        get = self._holders.get
        slot_pod = self._slot_pod
        result: dict[str, float] = {}
        i = 1
        for key in islice(keys, 1, None):
            nxt = alive & get(key, 0)
            if nxt != alive:
                dropped = alive & ~nxt
                while dropped:
                    low = dropped & -dropped
                    pod = slot_pod[low.bit_length() - 1]
                    if pod is not None:
                        result[pod] = float(i)
                    dropped ^= low
                if not nxt:
                    return result
                alive = nxt
            i += 1
        while alive:
            low = alive & -alive
            pod = slot_pod[low.bit_length() - 1]
            if pod is not None:
                result[pod] = float(i)
            alive ^= low
        return result

    def _longest_prefix_pending(self, keys: Sequence[int]) -> dict[str, float]:
        """`longest_prefix` while pending entries exist: a block is held when a pod holds it
        confirmed or pending; pending blocks weigh as GPU blocks (that is where the prefill
        will put them). Lower-tier weights apply to confirmed lower-tier blocks as usual."""
        get = self._holders.get
        pget = self._pending.get
        lower = self._lower_tier
        w = self.tier_weights
        slot_pod = self._slot_pod
        result: dict[str, float] = {}
        alive = get(keys[0], 0) | pget(keys[0], 0)
        deficit: dict[int, float] = {}
        i = 0
        n = len(keys)
        while alive:
            if lower:
                tiers = lower.get(keys[i])
                if tiers:
                    for slot, tier in tiers.items():
                        if alive >> slot & 1:
                            deficit[slot] = deficit.get(slot, 0.0) + (1.0 - w[tier])
            i += 1
            if i < n:
                key = keys[i]
                nxt = alive & (get(key, 0) | pget(key, 0))
            else:
                nxt = 0
            dropped = alive & ~nxt
            while dropped:
                low = dropped & -dropped
                slot = low.bit_length() - 1
                pod = slot_pod[slot]
                if pod is not None:
                    result[pod] = i - deficit.get(slot, 0.0)
                dropped ^= low
            alive = nxt
        return result
