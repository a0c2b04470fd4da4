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

`longest_prefix` walks the request's key chain AND-ing masks and stops as soon as no pod still
matches, so it costs O(matched blocks + pods that drop out), never O(index).
"""

from __future__ import annotations

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
        for key in reversed(keys):
            if key in pkeys:  # held already: its bit is set, only its LRU place moves
                del pkeys[key]
            else:
                holders[key] = get(key, 0) | bit
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
        pb = self._pods.get(pod)
        if pb is None:
            return
        self.clear_pod(pod)
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
