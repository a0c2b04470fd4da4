"""KVEventIngester: applies decoded KV events to a precise `BlockIndex`, fairly and in slices.

Owns three things:
- keying: a `BlockStored` is keyed with kvroute's own chained keys (`token_block_keys` over its
  `token_ids`, LoRA name as extra key), continuing the chain from the router key the pod's
  parent engine hash maps to. The index keeps engine hash → router key per pod, which is how
  `BlockRemoved` (engine hashes only) is applied. A parent we never saw (we joined mid-stream,
  or events were lost) is an orphan: counted, logged at debug, and keyed as a fresh chain as
  the spec prescribes — so its blocks stay removable by engine hash, and later events chained
  to them still key consistently.
- block size: when the engine's block size is a multiple of the router's, each engine block is
  keyed as `engine/router` router blocks (the router's keys are what requests are matched on);
  the engine hash maps to the last of them (so chaining works) and `(hash, j)` to the others
  (so removal drops them all). Any other mismatch is counted and the event skipped.
- KV-cache groups (hybrid models, vLLM >= 0.32 `group_idx` / `kv_cache_spec_kind`): only
  full-attention groups are indexed. A sliding-window or Mamba group keeps only the last
  window (or a state), so its blocks do not say a prefix is cached; and the groups share
  engine hashes, so a sliding-window group dropping a block must not remove the
  full-attention entry with the same hash. Stored events of other kinds are skipped (counted
  in `other_group_events`), and removals whose `group_idx` names such a group too. The
  prediction for a hybrid model is thus the full-attention prefix: an upper bound of what
  vLLM serves from cache (it also needs the window's blocks of the other groups).
- scheduling: batches wait in per-pod queues; `run()` drains them round-robin,
  `batches_per_turn` per pod per turn, and yields to the event loop every `slice_budget_ms`,
  so one pod's burst neither starves other pods nor stalls request handling on the same loop.

A pod's state is reset through its own queue (`reset_pod`), so a clear lands after the batches
that preceded it and before the ones that follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from router.blocks import BlockConfig, token_block_keys
from router.events.decode import EventDecodeError, decode_batch_packed
from router.events.settings import EventsSettings
from router.events.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.index import BlockIndex, Tier

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EventStats:
    """Counters of the KV-event feed (the subscriber writes the transport ones)."""

    batches: int = 0
    events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    all_cleared: int = 0
    unknown_tags: int = 0
    decode_errors: int = 0
    #: Decoded but unusable events: token count ≠ blocks × block size, token ids not uint32.
    invalid_events: int = 0
    #: Batches whose events failed to apply for an unexpected reason (logged like decode errors).
    apply_errors: int = 0
    #: Engine block size not a multiple of the router's.
    block_size_errors: int = 0
    #: Stored/removed events of non-full-attention KV-cache groups, skipped (see module doc).
    other_group_events: int = 0
    orphans: int = 0
    #: Messages without the three frames topic/seq/payload, or with a topic we cannot parse.
    malformed_messages: int = 0
    #: Bind-mode messages whose topic's pod `resolve_pod` did not accept (dropped).
    unknown_pods: int = 0
    gaps: int = 0
    replays: int = 0
    replayed_batches: int = 0
    replay_failures: int = 0
    seq_resets: int = 0
    rebuilds: int = 0
    queue_overflows: int = 0
    #: Times a pod's feed was found silent while its engine computed blocks (`FleetFeeds`).
    silent_feeds: int = 0
    #: Pods cleared because they went unhealthy or their engine restarted (`FleetFeeds`).
    pods_cleared: int = 0
    #: Longest single apply slice (ms) — the most the feed delayed the event loop at once.
    max_slice_ms: float = 0.0


# A queued item: (seq, payload); payload None means "clear the pod here".
_Item = tuple[int, bytes | None]

_TIER_BY_MEDIUM: dict[str | None, Tier] = {}

#: vLLM `KVCacheSpecKind` values whose cached blocks mean "this prefix is cached".
FULL_ATTENTION_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


def _tier(medium: str | None) -> Tier:
    tier = _TIER_BY_MEDIUM.get(medium)
    if tier is None:
        tier = _TIER_BY_MEDIUM.setdefault(medium, Tier.from_medium(medium))
    return tier


class KVEventIngester:
    """Applies KV-event batches of many pods to one `BlockIndex`. Not thread-safe: one loop."""

    def __init__(
        self,
        index: BlockIndex,
        block: BlockConfig | None = None,
        settings: EventsSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        block = block or BlockConfig(mode="tokens")
        self.index = index
        self.block_size = block.block_size
        self.seed = block.seed
        self.settings = settings or EventsSettings()
        self.clock = clock
        self.stats = EventStats()
        self._queues: dict[str, deque[_Item]] = {}
        self._ready: deque[str] = deque()  # pods with queued items, in round-robin order
        self._wakeup = asyncio.Event()
        self._ratio: dict[str, int] = {}  # pod → engine block size / router block size
        self._skipped_groups: dict[str, set[int]] = {}  # pod → group_idx not indexed
        self._rebuilding: dict[str, float] = {}  # pod → when its index was reset
        self._error_log: dict[str, tuple[float, int]] = {}  # pod → (last logged, suppressed)
        #: pod → its latest full-attention `BlockStored`, for `FleetFeeds` to compare the
        #: engine's block size and token ids with the router's config (it pops them).
        self.stored_samples: dict[str, BlockStored] = {}

    # ---------------------------------------------------------------- queueing
    def submit(self, pod: str, seq: int, payload: bytes) -> None:
        """Queue one batch payload of `pod` (in sequence order) for `run()` to apply."""
        q = self._queues.get(pod)
        if q is None:
            q = self._queues[pod] = deque()
        if not q:
            self._ready.append(pod)
        elif len(q) >= self.settings.max_queued_batches_per_pod:
            self.stats.queue_overflows += 1
            q.clear()
            self._reset(pod, q, f"queue over {self.settings.max_queued_batches_per_pod} batches")
        q.append((seq, payload))
        self._wakeup.set()

    def reset_pod(self, pod: str, reason: str) -> None:
        """Events of `pod` were lost: clear its blocks after what is queued, mark it rebuilding."""
        q = self._queues.get(pod)
        if q is None:
            q = self._queues[pod] = deque()
        if not q:
            self._ready.append(pod)
        self._reset(pod, q, reason)
        self._wakeup.set()

    def _reset(self, pod: str, q: deque[_Item], reason: str) -> None:
        q.append((-1, None))
        self.stats.rebuilds += 1
        self._rebuilding[pod] = self.clock()
        log.warning("kv events: pod %s rebuilding its block index (%s)", pod, reason)

    def forget_pod(self, pod: str) -> None:
        """The pod left: drop its queue and every index entry (wire to PodRegistry.on_remove)."""
        if self._queues.pop(pod, None) is not None:
            with contextlib.suppress(ValueError):
                self._ready.remove(pod)
        self._ratio.pop(pod, None)
        self._skipped_groups.pop(pod, None)
        self._rebuilding.pop(pod, None)
        self._error_log.pop(pod, None)
        self.stored_samples.pop(pod, None)
        self.index.drop_pod(pod)

    def rebuilding_pods(self) -> list[str]:
        """Pods whose index was reset for lost events within the last `rebuild_window_s`."""
        limit = self.clock() - self.settings.rebuild_window_s
        for pod in [p for p, t in self._rebuilding.items() if t < limit]:
            del self._rebuilding[pod]
        return list(self._rebuilding)

    @property
    def pending(self) -> int:
        """Batches queued and not yet applied."""
        return sum(len(q) for q in self._queues.values())

    # ---------------------------------------------------------------- draining
    def drain_slice(self, budget_s: float) -> int:
        """Apply queued batches round-robin until the queues are empty or `budget_s` is spent."""
        start = time.perf_counter()
        deadline = start + budget_s
        ready = self._ready
        queues = self._queues
        per_turn = self.settings.batches_per_turn
        n = 0
        while ready:
            pod = ready.popleft()
            q = queues[pod]
            for _ in range(per_turn):
                seq, payload = q.popleft()
                if payload is None:
                    self.index.clear_pod(pod)
                else:
                    self.apply_payload(pod, seq, payload)
                n += 1
                if not q:
                    break
            if q:
                ready.append(pod)
            if time.perf_counter() >= deadline:
                break
        spent_ms = (time.perf_counter() - start) * 1e3
        if spent_ms > self.stats.max_slice_ms:
            self.stats.max_slice_ms = spent_ms
        return n

    async def run(self) -> None:
        """Apply queued batches forever, yielding to the loop between slices."""
        budget = self.settings.slice_budget_ms / 1e3
        while True:
            if not self._ready:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self.drain_slice(budget)
            await _yield_to_loop()

    async def drain(self) -> None:
        """Apply everything queued now, in slices (for tests and shutdown)."""
        budget = self.settings.slice_budget_ms / 1e3
        while self._ready:
            self.drain_slice(budget)
            await _yield_to_loop()

    # ---------------------------------------------------------------- applying
    def apply_payload(self, pod: str, seq: int, payload: bytes) -> None:
        """Decode and apply one batch now. Undecodable payloads are counted, logged, skipped."""
        try:
            batch = decode_batch_packed(payload)
        except EventDecodeError as exc:
            self.stats.decode_errors += 1
            self._log_decode_error(pod, seq, exc)
            return
        if batch.unknown_tags:
            self.stats.unknown_tags += len(batch.unknown_tags)
            log.debug("kv events: pod %s seq %d skipped unknown %s", pod, seq, batch.unknown_tags)
        self.stats.batches += 1
        try:
            self.apply_events(pod, batch.events)
        except Exception as exc:  # a bug must not stop the feed: count, log, carry on
            self.stats.apply_errors += 1
            self._log_decode_error(pod, seq, exc)

    def apply_events(self, pod: str, events: Sequence[KVEvent]) -> None:
        now = self.clock()
        self.stats.events += len(events)
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(pod, ev, now)
            elif isinstance(ev, BlockRemoved):
                if ev.group_idx is not None and ev.group_idx in self._skipped_groups.get(pod, ()):
                    self.stats.other_group_events += 1
                    continue
                self._removed(pod, ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.index.clear_pod(pod)
                self.stats.all_cleared += 1
                self._rebuilding.pop(pod, None)

    def _stored(self, pod: str, ev: BlockStored, now: float) -> None:
        kind = ev.kv_cache_spec_kind
        if kind is not None and kind not in FULL_ATTENTION_KINDS:
            self.stats.other_group_events += 1
            if ev.group_idx is not None:
                self._skipped_groups.setdefault(pod, set()).add(ev.group_idx)
            return
        hashes = ev.block_hashes
        n = len(hashes)
        if not n:
            return
        self.stored_samples[pod] = ev
        router_bs = self.block_size
        engine_bs = ev.block_size
        if engine_bs == router_bs:
            ratio = 1
        elif engine_bs > 0 and engine_bs % router_bs == 0:
            ratio = engine_bs // router_bs
        else:
            self.stats.block_size_errors += 1
            return
        if len(ev.token_ids) != n * engine_bs:
            self.stats.invalid_events += 1
            return
        index = self.index
        parent_hash = ev.parent_block_hash
        parent: int | None = None
        if parent_hash is not None:
            parent = index.engine_key(pod, parent_hash)
            if parent is None:
                self.stats.orphans += 1
                log.debug("kv events: pod %s stored blocks under unknown parent", pod)
        try:
            # Decoding packed them into an array('I') (`decode_batch_packed`) where it could;
            # token_block_keys takes that in place and converts a plain list itself.
            keys = token_block_keys(ev.token_ids, router_bs, self.seed, ev.lora_name, parent)
        except (OverflowError, ValueError, TypeError):
            self.stats.invalid_events += 1
            return
        engine: Sequence[Hashable] = hashes
        if ratio != 1:
            engine = _expand(hashes, ratio)
        if self._ratio.get(pod, 1) != ratio:
            self._ratio[pod] = ratio
        index.add_blocks(pod, keys, engine_hashes=engine, tier=_tier(ev.medium), now=now)
        self.stats.blocks_stored += n

    def _removed(self, pod: str, hashes: Sequence[Hashable]) -> None:
        ratio = self._ratio.get(pod, 1)
        if ratio != 1:
            hashes = _expand(hashes, ratio)
        self.stats.blocks_removed += self.index.remove_engine_hashes(pod, hashes) // ratio

    def _log_decode_error(self, pod: str, seq: int, exc: Exception) -> None:
        now = self.clock()
        last, suppressed = self._error_log.get(pod, (float("-inf"), 0))
        if now - last < self.settings.decode_error_log_interval_s:
            self._error_log[pod] = (last, suppressed + 1)
            return
        self._error_log[pod] = (now, 0)
        log.warning(
            "kv events: pod %s seq %d not applied: %s (%d more since last report)",
            pod,
            seq,
            exc,
            suppressed,
        )


async def _yield_to_loop() -> None:
    """Let everything that became ready during our slice run before the next slice.

    `sleep(0)` would queue our continuation ahead of the timers and I/O the loop collects on
    its next iteration (and the task steps those wake), so they would wait for a second slice.
    A zero-delay timer is ordered after every timer already due and after that iteration's
    I/O callbacks, which bounds the loop's lag to about one slice.
    """
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.call_later(0, _resolve, fut)
    await fut


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _expand(hashes: Sequence[Hashable], ratio: int) -> list[Hashable]:
    """Engine hash h → router-block entries (h, 0) … (h, ratio-2), h."""
    out: list[Hashable] = []
    for h in hashes:
        out.extend((h, j) for j in range(ratio - 1))
        out.append(h)
    return out
