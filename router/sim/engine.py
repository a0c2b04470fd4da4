"""One vLLM (v1) engine, modelled: scheduler + paged KV cache + step-time model.

Owns the request lifecycle inside a pod (waiting → [KV transfer] → running prefill → decode →
finished), continuous batching, chunked prefill, preemption by recompute and the engine's
counters. The KV blocks live in `router.sim.kv_cache.KVCache`; step times come from
`router.sim.latency.LatencyModel`. No clock of its own: the caller passes `now`, so the same
engine runs in virtual time (simulator) or against the wall clock (emulator).

Public API
----------
``EngineConfig(block_size=16, num_gpu_blocks=4096, num_cpu_blocks=0,
max_num_batched_tokens=8192, max_num_seqs=256, role=Role.BOTH, seed=0,
enable_prefix_caching=True)`` — ``EngineConfig.from_profile(profile, **overrides)`` takes
``num_gpu_blocks``, ``num_cpu_blocks`` (``Profile.cpu_kv_cache_gib``) and ``block_size`` from a
latency profile.

``SimRequest(request_id, token_ids, max_output_tokens, arrival=0.0, lora=None,
block_keys=None, output_token_ids=None, kv_link=None, kv_source=None)`` — ``token_ids``: the
prompt (list or numpy array); ``block_keys``: the prompt's chained block keys if the caller
already has them (must equal ``token_block_keys(token_ids, block_size, seed, extra=lora)``);
``output_token_ids``: what the model "generates" (a multi-turn workload passes the answer
that the next turn's prompt repeats, so later turns hit the cached answer blocks; default:
deterministic pseudo-random tokens); ``kv_link``: decode role only — the prompt's KV is pulled
from the prefill pod ``kv_source`` over this `KVLink`.

``Engine(name, config, latency, on_events=None)``:

- ``add_request(req, now)`` — enqueue (FCFS). Raises ``ValueError`` for an empty prompt,
  ``max_output_tokens < 1``, a duplicate id, or a request that can never fit in the cache.
- ``step(now, until=None) -> StepOutcome`` — schedule and run one engine step that starts at
  ``now``; ``StepOutcome.duration_s`` is how long it takes; the caller advances its clock by
  that and calls ``step`` again. Tokens, first tokens and finishes happen at
  ``now + duration_s``. With ``until`` (the next time anything outside could hand the engine
  work, e.g. the next arrival) the engine may run several consecutive decode-only steps in one
  call: each fused step starts before ``until``, no waiting request could be admitted, no KV
  pull completes, and nothing but block bookkeeping happens (a step where a request finishes
  ends the run). Results, and event timestamps, are identical to calling ``step`` repeatedly;
  ``StepOutcome.steps`` says how many ran. A call with nothing to run returns
  ``duration_s == 0`` and ``steps == 0``.
- ``has_work()`` — requests waiting, transferring or running.
- ``next_step_at(now) -> float | None`` — when ``step`` next has something to do: ``now`` if
  runnable work exists, the completion time of the earliest KV transfer if only transfers are
  in flight (or the waiting requests wait for blocks a transfer holds), ``None`` when idle or
  stalled until a ``release`` / new request.
- ``release(request_id)`` — prefill role: free the blocks pinned for a finished request once
  its decode pod has pulled them (``StepOutcome.kv_pulled`` on the decode engine says when).
- ``pinned_blocks(request_id) -> list[int]`` — prefill role: the block ids held for it.
- ``abort(request_id)`` — drop a request wherever it is (frees its blocks).
- ``reset_prefix_cache(now) -> bool`` — vLLM's reset (refused while blocks are in use).
- ``metrics() -> EngineMetrics`` — waiting, running, kv_utilization and the counters.
- ``cached_keys() -> dict[int, str]`` — every cached block key → "GPU" / "CPU".
- ``prefix_hit_blocks(keys) -> int`` — leading keys cached on GPU (for an oracle view).

``on_events(events, ts)`` is called with each batch of KV events (``BlockStored``,
``BlockRemoved``, ``AllBlocksCleared`` from ``router.events.types``) and the time they are
published: the end of the step that caused them (``now + duration_s``), or ``now`` for events
outside a step (transfer completions, reset). Engine hashes are our block keys (ints).

Roles: ``both`` serves whole requests; ``prefill`` computes the prompt, samples the first
token and finishes the request with its blocks pinned (``FinishedRequest.kv_pinned``) until
``release``; ``decode`` serves whole requests, and for a request with ``kv_link`` it looks up
its own prefix cache, allocates the prompt's blocks, pulls only the blocks it does not hold
over the link (``KVLink.reserve``), caches them (``BlockStored``) when the transfer completes,
then recomputes the last prompt token to sample the first token and decodes.

Scheduling per step (vLLM v1): running decode requests each get one token first; then running
partial prefills and then waiting requests (FCFS, the queue stops at the first one that does
not fit) take prefill chunks from the remaining ``max_num_batched_tokens``; a request that
needs a block when none is free preempts the most recently admitted running request
(possibly itself), whose blocks are freed (they stay cached) and which goes back to the front
of the waiting queue with zero computed tokens (recompute); a step that preempted admits no
waiting request.

Speed: a decode request is not touched on steps where nothing happens to it. Its token counts
are derived from the engine's step counter, and a calendar maps step numbers to the requests
that must be looked at then (a block fills, a new block is needed, it finishes), so a step
costs O(requests with something to do + prefill chunks), not O(batch). Blocks are integer ids
(see `KVCache`), so per-request cache work is a few list operations per block.

Deliberate simplifications: no max_model_len, no speculative decoding, no EOS (every request
produces exactly max_output_tokens), one KV-cache group (sliding-window layers only cap the
attention cost, their KV is counted in full), KV pulls on one link are serialised but links
do not share bandwidth with each other.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum

import numpy as np
import xxhash

from router.blocks import token_block_keys
from router.events.types import KVEvent
from router.pods import Role
from router.sim.kv_cache import KVCache
from router.sim.latency import LatencyModel, Profile
from router.sim.transfer import KVLink

EventSink = Callable[[list[KVEvent], float], None]

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineMetrics",
    "EventSink",
    "FinishedRequest",
    "KVLink",
    "SimRequest",
    "StepOutcome",
]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    num_gpu_blocks: int = 4096
    num_cpu_blocks: int = 0
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    role: Role = Role.BOTH
    #: Seed of the block-key chain (must match the router's `BlockConfig.seed`).
    seed: int = 0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_gpu_blocks < 1 or self.num_cpu_blocks < 0:
            raise ValueError("block_size, num_gpu_blocks must be ≥ 1 and num_cpu_blocks ≥ 0")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM refuses this too: every running request must get its decode token.
            raise ValueError("need max_num_seqs ≥ 1 and max_num_batched_tokens ≥ max_num_seqs")
        object.__setattr__(self, "role", Role(self.role))

    @classmethod
    def from_profile(cls, profile: Profile, **overrides: object) -> EngineConfig:
        """Block size, GPU and CPU-tier block counts from a latency profile; anything else
        overridable."""
        base = cls(
            block_size=profile.block_size,
            num_gpu_blocks=profile.num_gpu_blocks,
            num_cpu_blocks=profile.num_cpu_blocks,
        )
        return replace(base, **overrides) if overrides else base  # type: ignore[arg-type]


@dataclass(slots=True, eq=False)
class SimRequest:
    request_id: str
    token_ids: Sequence[int] | np.ndarray
    max_output_tokens: int
    arrival: float = 0.0
    lora: str | None = None
    block_keys: list[int] | None = None
    output_token_ids: Sequence[int] | np.ndarray | None = None
    kv_link: KVLink | None = None
    kv_source: str | None = None


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    request_id: str
    engine: str
    arrival: float
    #: When the engine first scheduled it (queue time = scheduled_at - arrival).
    scheduled_at: float
    first_token_at: float
    finished_at: float
    prompt_tokens: int
    output_tokens: int
    #: Prompt tokens found in the prefix cache at first admission (GPU + CPU tier).
    cached_tokens: int
    #: Prompt tokens pulled from a prefill pod (decode role).
    transferred_tokens: int
    preemptions: int
    #: Prefill role: the blocks stay allocated until `Engine.release(request_id)`.
    kv_pinned: bool = False

    @property
    def ttft(self) -> float:
        return self.first_token_at - self.arrival

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 for single-token outputs)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.finished_at - self.first_token_at) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.finished_at - self.arrival


@dataclass(slots=True)
class StepOutcome:
    duration_s: float
    #: Request ids whose first token came out at the end of this step.
    first_tokens: list[str] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)
    #: Decode role: request ids whose KV pull completed (release them on the prefill pod).
    kv_pulled: list[str] = field(default_factory=list)
    #: Engine steps this call ran (0 when there was nothing to run, > 1 when fused).
    steps: int = 0
    num_tokens: int = 0


@dataclass(slots=True)
class EngineMetrics:
    """What a vLLM pod's /metrics would show (gauges, then counters); a fresh snapshot."""

    waiting: int
    running: int
    kv_utilization: float
    num_gpu_blocks: int
    used_blocks: int
    cached_blocks: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    finished_requests: int
    steps: int
    busy_time_s: float
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()


class _State(IntEnum):
    WAITING = 0
    TRANSFERRING = 1
    PREFILL = 2
    DECODE = 3
    DONE = 4


class _Seq:
    """Engine-side state of one request."""

    __slots__ = (
        "admit",
        "base_tick",
        "blocks",
        "cached_tokens",
        "computed",
        "due",
        "first_token_at",
        "generated",
        "keys",
        "max_out",
        "out",
        "preemptions",
        "prompt",
        "prompt_len",
        "pulled",
        "queried",
        "ready_at",
        "req",
        "scheduled_at",
        "state",
        "transferred_tokens",
    )

    def __init__(self, req: SimRequest, prompt: np.ndarray, max_out: int) -> None:
        self.req = req
        self.prompt = prompt
        self.prompt_len = len(prompt)
        self.max_out = max_out
        self.out: np.ndarray | None = None
        # A copy: output blocks are appended to it as they fill.
        self.keys: list[int] | None = None if req.block_keys is None else list(req.block_keys)
        self.blocks: list[int] = []  # KV block ids
        self.computed = 0  # tokens with KV computed (at base_tick while decoding)
        self.generated = 0  # output tokens sampled (at base_tick while decoding)
        self.base_tick = 0
        self.due = -1
        self.admit = 0
        self.state = _State.WAITING
        self.first_token_at: float | None = None
        self.scheduled_at: float | None = None
        self.cached_tokens = 0
        self.transferred_tokens = 0
        self.preemptions = 0
        self.queried = False
        self.pulled = False  # its KV pull completed (a later preemption recomputes locally)
        self.ready_at = 0.0

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated


class Engine:
    """A modelled vLLM engine (see the module docstring for the API and semantics)."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        latency: LatencyModel,
        on_events: EventSink | None = None,
        cache: KVCache | None = None,
    ) -> None:
        """`cache`: a KV cache shared with other engines (the simulator's pooled oracle);
        by default the engine gets its own of `config.num_gpu_blocks` blocks."""
        self.name = name
        self.config = config
        self.latency = latency
        self.on_events = on_events
        self.cache = cache or KVCache(
            config.num_gpu_blocks,
            config.block_size,
            config.num_cpu_blocks,
            emit_events=on_events is not None,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self._bs = config.block_size
        self._seqs: dict[str, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        #: Pulled requests (KV in place, blocks held): admitted ahead of the waiting queue, so
        #: a preempted request that does not fit cannot starve them of a seat while they hold
        #: the blocks it needs.
        self._ready: deque[_Seq] = deque()
        self._running: dict[str, _Seq] = {}  # admission order; the last is preempted first
        self._transfers: list[tuple[float, int, _Seq]] = []  # heap of (ready_at, n, seq)
        self._pinned: dict[str, list[int]] = {}
        self._calendar: dict[int, list[_Seq]] = {}
        self._tick = 0
        #: The last step could run nothing: waiting requests wait for blocks to come back
        #: (a transfer completing, a release, a new request); cleared by any of those.
        self._stalled = False
        self._blocked_head: _Seq | None = None  # waiting head that did not fit, and when
        self._blocked_sig: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._admit_counter = 0
        self._lora_requests = 0  # requests with a LoRA adapter not yet finished
        self._n_dec = 0
        self._dec_ctx = 0  # Σ (computed + 1) over decode requests, as of `_tick`
        self._prefilling: dict[str, _Seq] = {}  # running requests still in prefill
        self._sliding = latency.profile.model.sliding_window
        self._kv_block_bytes = latency.profile.kv_bytes_per_block
        # counters
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.finished_requests = 0
        self.steps = 0
        self.busy_time_s = 0.0

    # ================================================================ public
    def add_request(self, req: SimRequest, now: float) -> None:
        if req.request_id in self._seqs or req.request_id in self._pinned:
            raise ValueError(f"{self.name}: duplicate request id {req.request_id!r}")
        prompt = np.asarray(req.token_ids, dtype=np.uint32)
        if prompt.ndim != 1 or len(prompt) == 0:
            raise ValueError(f"{self.name}: request {req.request_id!r} has an empty prompt")
        if req.max_output_tokens < 1:
            raise ValueError(f"{self.name}: request {req.request_id!r}: max_output_tokens < 1")
        max_out = 1 if self.config.role == Role.PREFILL else req.max_output_tokens
        need = -(-(len(prompt) + max_out) // self._bs)
        if need > self.config.num_gpu_blocks:
            raise ValueError(
                f"{self.name}: request {req.request_id!r} needs {need} KV blocks, the cache "
                f"has {self.config.num_gpu_blocks}"
            )
        if req.kv_link is not None and self.config.role == Role.PREFILL:
            raise ValueError(f"{self.name}: a prefill pod cannot pull KV (request has kv_link)")
        seq = _Seq(req, prompt, max_out)
        if seq.keys is not None and len(seq.keys) != len(prompt) // self._bs:
            raise ValueError(
                f"{self.name}: request {req.request_id!r}: {len(seq.keys)} block keys for "
                f"{len(prompt) // self._bs} full blocks"
            )
        self._seqs[req.request_id] = seq
        self._waiting.append(seq)
        self._stalled = False
        if req.lora:
            self._lora_requests += 1

    def has_work(self) -> bool:
        return bool(self._waiting or self._ready or self._running or self._transfers)

    def next_step_at(self, now: float) -> float | None:
        if self._running or (not self._stalled and self._runnable_waiting()):
            return now
        if self._transfers:
            return max(now, self._transfers[0][0])
        return None

    def wake(self) -> None:
        """Blocks may have come back to a shared cache: retry the waiting queue next step."""
        self._stalled = False

    def release(self, request_id: str) -> None:
        blocks = self._pinned.pop(request_id, None)
        if blocks is None:
            raise KeyError(f"{self.name}: no pinned blocks for request {request_id!r}")
        self.cache.free(blocks)
        self._stalled = False

    def pinned_blocks(self, request_id: str) -> list[int]:
        """KV block ids a finished prefill request keeps pinned (what a NIXL read would fetch)."""
        return list(self._pinned.get(request_id, ()))

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.req.lora:
            self._lora_requests -= 1
        if seq.state == _State.DECODE:
            self._sync(seq)
            self._leave_decode(seq)
            del self._running[request_id]
        elif seq.state == _State.PREFILL:
            del self._running[request_id]
            del self._prefilling[request_id]
        elif seq.state == _State.WAITING:
            (self._ready if seq in self._ready else self._waiting).remove(seq)
        elif seq.state == _State.TRANSFERRING:
            self._transfers = [t for t in self._transfers if t[2] is not seq]
            heapq.heapify(self._transfers)
        self.cache.free(seq.blocks)
        seq.blocks = []
        seq.state = _State.DONE
        self._stalled = False
        return True

    def reset_prefix_cache(self, now: float) -> bool:
        ok = self.cache.reset()
        self._flush(now)
        return ok

    def metrics(self) -> EngineMetrics:
        running_adapters = waiting_adapters = frozenset[str]()
        if self._lora_requests:  # O(requests) only when LoRA requests exist
            running_adapters = frozenset(s.req.lora for s in self._running.values() if s.req.lora)
            waiting_adapters = frozenset(
                s.req.lora for q in (self._waiting, self._ready) for s in q if s.req.lora
            )
        return EngineMetrics(
            waiting=len(self._waiting) + len(self._ready) + len(self._transfers),
            running=len(self._running),
            kv_utilization=self.cache.usage,
            num_gpu_blocks=self.config.num_gpu_blocks,
            used_blocks=self.cache.num_used,
            cached_blocks=self.cache.num_cached,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            preemptions=self.preemptions,
            finished_requests=self.finished_requests,
            steps=self.steps,
            busy_time_s=self.busy_time_s,
            running_adapters=running_adapters,
            waiting_adapters=waiting_adapters,
        )

    def cached_keys(self) -> dict[int, str]:
        return self.cache.cached_keys()

    def prefix_hit_blocks(self, keys: Sequence[int]) -> int:
        return self.cache.prefix_blocks(keys)

    # ================================================================= step
    def step(self, now: float, until: float | None = None) -> StepOutcome:
        out = StepOutcome(0.0)
        if self._transfers:
            self._complete_transfers(now, out)
        if (
            self._n_dec
            and not self._waiting
            and not self._ready
            and not self._prefilling
            and self._tick not in self._calendar
        ):
            # Every running request decodes and nothing is due: the cheap path.
            duration = self._decode_time()
            self._advance(duration)
            out.num_tokens = self._n_dec
        else:
            duration, decode_only = self._full_step(now, out)
            out.duration_s = duration
            if not decode_only:
                return out  # idle, or prefill / finishes happened: no fusion
        out.duration_s = duration
        out.steps = 1
        if until is not None:
            self._fuse(now, until, out)
        return out

    def _full_step(self, now: float, out: StepOutcome) -> tuple[float, bool]:
        """Schedule and apply one step with everything vLLM's scheduler does.

        Returns its duration and whether it was a decode-only step without finishes (one that
        later steps may be fused to).
        """
        tick = self._tick
        bs = self._bs
        budget = self.config.max_num_batched_tokens - self._n_dec
        preemptions_before = self.preemptions
        extra_time = 0.0  # CPU-tier reloads

        # 1. decode requests with something due at this step (block boundary / finish).
        finishing: list[_Seq] = []
        due = self._calendar.pop(tick, None)
        if due:
            self._process_due(due, tick, finishing)

        # 2. prefill chunks: running partial prefills, then waiting requests (FCFS).
        chunks: list[tuple[_Seq, int, int]] = []  # (seq, computed before, chunk)
        if self._prefilling and budget > 0:
            for seq in list(self._prefilling.values()):
                if budget <= 0:
                    break
                if seq.state != _State.PREFILL:
                    continue  # preempted by an earlier request of this loop
                chunk = min(seq.num_tokens - seq.computed, budget)
                need = -(-(seq.computed + chunk) // bs) - len(seq.blocks)
                if need > 0 and not self._grow(seq, need):
                    continue
                self._add_chunk(seq, chunk, chunks)
                budget -= chunk
        # As in vLLM, a step that had to preempt admits nobody new.
        if self.preemptions == preemptions_before:
            if self._ready and budget > 0:
                budget = self._admit_ready(now, budget, chunks)
            if self._waiting and budget > 0:
                budget, extra_time = self._admit_waiting(now, budget, chunks)

        # 3. run the step.
        n_dec = self._n_dec
        num_tokens = n_dec + sum(ch for _, _, ch in chunks)
        if num_tokens == 0 and not finishing:
            self._stalled = not out.kv_pulled
            self._flush(now)
            return 0.0, False
        self._stalled = False
        pairs = 0.0
        kv_read = float(self._dec_ctx)
        completing: list[_Seq] = []
        for seq, before, chunk in chunks:
            pairs += chunk * (before + (chunk + 1) / 2.0)
            kv_read += before + chunk
            if before + chunk == seq.num_tokens:
                completing.append(seq)
        window_pairs = window_read = None
        if self._sliding:
            w = self._sliding
            window_pairs = sum(ch * min(b + ch, w) for _, b, ch in chunks)
            window_read = min(self._dec_ctx, n_dec * w) + sum(min(b + ch, w) for _, b, ch in chunks)
        # A chunk of one token (a pulled P/D request recomputing its last prompt token) keeps
        # the batch uniform decode; anything longer makes it a mixed batch.
        mixed = any(ch > 1 for _, _, ch in chunks)
        duration = (
            self.latency.step_time(
                num_tokens,
                n_dec + len(completing),
                pairs,
                kv_read,
                window_pairs,
                window_read,
                mixed,
            )
            + extra_time
        )
        end = now + duration

        # 4. apply the results at the end of the step.
        self._advance(duration)
        for seq, _before, chunk in chunks:
            seq.computed += chunk
        for seq in completing:
            self._prefill_done(seq, end, out)
        for seq in finishing:
            if seq.state != _State.DECODE:
                continue  # preempted later in this step's scheduling
            self._sync(seq)  # now past this step: all tokens sampled
            self._leave_decode(seq)
            self._finish(seq, end, out)
        out.steps = 1
        out.num_tokens = num_tokens
        self._flush(end)
        return duration, not chunks and not finishing

    def _fuse(self, now: float, until: float, out: StepOutcome) -> None:
        """Run the following decode steps in this call while nothing outside could change them.

        A following step is fused when it starts before `until`, no waiting request could be
        admitted, no KV pull completes before it starts, and what is due at it is only block
        bookkeeping that cannot fail (a block fills, a new block is free to take); a step where
        a request finishes ends the run (it is left to the next call). Events are published
        with the end time of the step that caused them, as unfused steps would.
        """
        total = out.duration_s
        max_seqs = self.config.max_num_seqs
        calendar = self._calendar
        while self._n_dec:
            start = now + total
            if start >= until:
                break
            if (self._waiting or self._ready) and len(self._running) < max_seqs:
                break
            if self._transfers and self._transfers[0][0] <= start:
                break
            tick = self._tick
            due = calendar.get(tick)
            if due is not None:
                if not self._due_is_bookkeeping(due, tick):
                    break
                del calendar[tick]
                self._process_due(due, tick, None)
            d = self._decode_time()
            self._advance(d)
            total += d
            out.steps += 1
            if due is not None:
                self._flush(now + total)
        out.duration_s = total

    def _process_due(self, due: list[_Seq], tick: int, finishing: list[_Seq] | None) -> None:
        """Block boundaries and finishes of decode requests at step `tick` (vLLM order)."""
        bs = self._bs
        if len(due) > 1:
            due.sort(key=_admit_order)
        for seq in due:
            if seq.due != tick or seq.state != _State.DECODE:
                continue  # stale entry (preempted or rescheduled)
            self._sync(seq)
            c = seq.computed
            if c == len(seq.blocks) * bs and not self._grow(seq, 1):
                continue  # preempted itself
            if (c + 1) % bs == 0:
                self._cache_range(seq, (c + 1) // bs - 1, (c + 1) // bs)
            if seq.generated + 1 >= seq.max_out:
                assert finishing is not None
                finishing.append(seq)
            else:
                self._schedule_due(seq, tick + 1, c + 1, seq.generated + 1)

    def _due_is_bookkeeping(self, due: list[_Seq], tick: int) -> bool:
        """True when nobody due at `tick` finishes and every block it needs is free."""
        bs = self._bs
        need = 0
        for seq in due:
            if seq.due != tick or seq.state != _State.DECODE:
                continue
            d = tick - seq.base_tick
            if seq.generated + d + 1 >= seq.max_out:
                return False
            if seq.computed + d == len(seq.blocks) * bs:
                need += 1
        return need <= self.cache.num_free

    def _decode_time(self) -> float:
        """Time of a step in which exactly the running decode requests each take one token."""
        n = self._n_dec
        window = min(self._dec_ctx, n * self._sliding) if self._sliding else None
        return self.latency.step_time(n, n, 0.0, float(self._dec_ctx), None, window)

    def _advance(self, duration: float) -> None:
        """Account one executed step: every decode request computed and sampled one token."""
        n = self._n_dec
        self._tick += 1
        self._dec_ctx += n
        self.generation_tokens += n
        self.steps += 1
        self.busy_time_s += duration

    def _runnable_waiting(self) -> bool:
        if not self._waiting and not self._ready:
            return False
        return len(self._running) < self.config.max_num_seqs

    def _sync(self, seq: _Seq) -> None:
        """Bring a decode request's lazy counters up to the current tick."""
        d = self._tick - seq.base_tick
        if d:
            seq.computed += d
            seq.generated += d
            seq.base_tick = self._tick

    def _schedule_due(self, seq: _Seq, tick: int, c: int, g: int) -> None:
        """Register the next step at which the decode request needs attention.

        At step `tick` it will have computed `c` tokens and sampled `g`.
        """
        cap = len(seq.blocks) * self._bs
        to_fill = cap - 1 - c if c < cap else 0
        to_finish = seq.max_out - 1 - g
        when = tick + (to_fill if to_fill < to_finish else to_finish)
        seq.due = when
        bucket = self._calendar.get(when)
        if bucket is None:
            self._calendar[when] = [seq]
        else:
            bucket.append(seq)

    def _keys(self, seq: _Seq) -> list[int]:
        if seq.keys is None:
            seq.keys = token_block_keys(seq.prompt, self._bs, self.config.seed, seq.req.lora)
        return seq.keys

    def _tokens(self, seq: _Seq, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of prompt + output."""
        p = seq.prompt_len
        if end <= p:
            return seq.prompt[start:end]
        out = self._output(seq)
        if start >= p:
            return out[start - p : end - p]
        return np.concatenate((seq.prompt[start:], out[: end - p]))

    def _output(self, seq: _Seq) -> np.ndarray:
        """The request's output tokens: the given ones, else deterministic pseudo-random ids."""
        if seq.out is None:
            given = seq.req.output_token_ids
            n_given = 0 if given is None else len(given)
            if given is not None and n_given >= seq.max_out:
                seq.out = np.asarray(given, dtype=np.uint32)
            else:
                h = np.uint64(xxhash.xxh3_64_intdigest(seq.req.request_id.encode()))
                mixed = (np.arange(1, seq.max_out + 1, dtype=np.uint64) * _GOLDEN + h) >> 40
                gen = (mixed % np.uint64(32000) + np.uint64(1)).astype(np.uint32)
                if given is not None:
                    gen[:n_given] = np.asarray(given, dtype=np.uint32)
                seq.out = gen
        return seq.out

    def _cache_range(self, seq: _Seq, lo: int, hi: int) -> None:
        """Cache seq's blocks [lo, hi) that just became full."""
        if not self.config.enable_prefix_caching or lo >= hi:
            return
        keys = self._keys(seq)
        bs = self._bs
        if len(keys) < hi:
            # Past the prompt: key every full block of prompt + output in one go (the output
            # tokens are known in advance), continuing the prompt's chain.
            start = len(keys)
            total = (seq.prompt_len + seq.max_out) // bs
            keys.extend(
                token_block_keys(
                    self._tokens(seq, start * bs, total * bs),
                    bs,
                    self.config.seed,
                    seq.req.lora,
                    keys[-1] if keys else None,
                )
            )
        cache = self.cache
        tokens = self._tokens(seq, lo * bs, hi * bs) if cache.keep_tokens else None
        cache.cache_blocks(seq.blocks, keys, lo, hi, tokens, seq.req.lora)

    def _grow(self, seq: _Seq, n: int) -> bool:
        """Give a running request `n` more blocks, preempting from the tail if needed.

        Returns False when the request itself was preempted.
        """
        while True:
            got = self.cache.allocate(n)
            if got is not None:
                seq.blocks.extend(got)
                return True
            victim = self._preempt_last()
            if victim is seq:
                return False

    def _preempt_last(self) -> _Seq:
        _, victim = self._running.popitem()
        if victim.state == _State.DECODE:
            self._sync(victim)
            self._leave_decode(victim)
        else:
            del self._prefilling[victim.req.request_id]
        self.cache.free(victim.blocks)
        victim.blocks = []
        victim.computed = 0
        victim.state = _State.WAITING
        victim.due = -1
        victim.preemptions += 1
        self.preemptions += 1
        self._waiting.appendleft(victim)
        return victim

    def _leave_decode(self, seq: _Seq) -> None:
        """Remove a synced decode request from the decode aggregates."""
        self._n_dec -= 1
        self._dec_ctx -= seq.computed + 1
        seq.due = -1

    def _add_chunk(self, seq: _Seq, chunk: int, chunks: list[tuple[_Seq, int, int]]) -> None:
        """Put a prefill chunk in this step; blocks it fills are cached now, as vLLM does."""
        before = seq.computed
        chunks.append((seq, before, chunk))
        bs = self._bs
        self._cache_range(seq, before // bs, (before + chunk) // bs)

    def _admit_ready(self, now: float, budget: int, chunks: list[tuple[_Seq, int, int]]) -> int:
        """Admit pulled requests: their prompt KV is in place, the rest is computed here."""
        bs = self._bs
        max_seqs = self.config.max_num_seqs
        ready = self._ready
        while ready and budget > 0 and len(self._running) < max_seqs:
            seq = ready[0]
            chunk = min(seq.num_tokens - seq.computed, budget)
            need = -(-(seq.computed + chunk) // bs) - len(seq.blocks)
            if need > 0:
                got = self.cache.allocate(need)
                if got is None:
                    break
                seq.blocks.extend(got)
            ready.popleft()
            self._start_running(seq, now)
            self._add_chunk(seq, chunk, chunks)
            budget -= chunk
        return budget

    def _admit_waiting(
        self, now: float, budget: int, chunks: list[tuple[_Seq, int, int]]
    ) -> tuple[int, float]:
        """Admit waiting requests FCFS into this step; returns (budget left, reload time)."""
        cache = self.cache
        bs = self._bs
        max_seqs = self.config.max_num_seqs
        reload_time = 0.0
        waiting = self._waiting
        while waiting and budget > 0 and len(self._running) < max_seqs:
            seq = waiting[0]
            # The head did not fit last time and nothing it depends on changed: skip the walk.
            sig = (cache.num_free, cache.evictions, cache.num_cached, budget)
            if self._blocked_head is seq and self._blocked_sig == sig:
                break
            num_tokens = seq.num_tokens
            keys = self._keys(seq) if self.config.enable_prefix_caching else []
            hits, cpu_keys, in_queue = cache.find_prefix(keys, (num_tokens - 1) // bs)
            n_hit = len(hits) + len(cpu_keys)
            hit_tokens = n_hit * bs
            if seq.req.kv_link is not None and not seq.pulled:
                # P/D decode: allocate the whole prompt now, pull what we lack.
                total = -(-seq.prompt_len // bs)
                new_needed = total - len(hits)
                if new_needed > cache.num_free - in_queue:
                    self._blocked_head, self._blocked_sig = seq, sig
                    break
                waiting.popleft()
                reload_time += self._take_blocks(seq, hits, cpu_keys, new_needed, hit_tokens, now)
                pulled = total - n_hit
                seq.transferred_tokens = seq.prompt_len - hit_tokens
                seq.ready_at = seq.req.kv_link.reserve(now, pulled * self._kv_block_bytes)
                seq.state = _State.TRANSFERRING
                heapq.heappush(self._transfers, (seq.ready_at, self._admit_counter, seq))
                self._admit_counter += 1
                continue
            chunk = min(num_tokens - hit_tokens, budget)
            new_needed = -(-(hit_tokens + chunk) // bs) - len(hits)
            if new_needed > cache.num_free - in_queue:
                self._blocked_head, self._blocked_sig = seq, sig
                break
            waiting.popleft()
            reload_time += self._take_blocks(seq, hits, cpu_keys, new_needed, hit_tokens, now)
            seq.computed = hit_tokens
            self._start_running(seq, now)
            self._add_chunk(seq, chunk, chunks)
            budget -= chunk
        return budget, reload_time

    def _take_blocks(
        self,
        seq: _Seq,
        hits: list[int],
        cpu_keys: list[int],
        new_needed: int,
        hit_tokens: int,
        now: float,
    ) -> float:
        """Admit `seq` to the cache: count its prefix query, reuse its GPU hits, allocate the
        rest (reloading CPU-tier hits). Returns the CPU→GPU reload time this adds."""
        cache = self.cache
        self._count_query(seq, hit_tokens, now)
        cache.touch(hits)
        new = cache.allocate_reloading(new_needed, cpu_keys, cache.key[hits[-1]] if hits else None)
        assert new is not None  # the caller checked the free blocks
        seq.blocks = hits + new
        return self.latency.transfer_time_cpu(len(cpu_keys))

    def _count_query(self, seq: _Seq, hit_tokens: int, now: float) -> None:
        if seq.queried:
            return
        seq.queried = True
        seq.cached_tokens = hit_tokens
        seq.scheduled_at = now
        self.prefix_cache_queries += seq.prompt_len
        self.prefix_cache_hits += hit_tokens
        self.prompt_tokens += seq.prompt_len

    def _start_running(self, seq: _Seq, now: float) -> None:
        if seq.scheduled_at is None:
            seq.scheduled_at = now
        seq.state = _State.PREFILL
        seq.admit = self._admit_counter
        self._admit_counter += 1
        self._running[seq.req.request_id] = seq
        self._prefilling[seq.req.request_id] = seq

    def _complete_transfers(self, now: float, out: StepOutcome) -> None:
        bs = self._bs
        while self._transfers and self._transfers[0][0] <= now:
            _, _, seq = heapq.heappop(self._transfers)
            # The pulled full blocks are now real KV in our cache.
            first = seq.cached_tokens // bs
            self._cache_range(seq, first, seq.prompt_len // bs)
            seq.computed = seq.prompt_len - 1  # vLLM recomputes the last token for logits
            seq.pulled = True
            seq.state = _State.WAITING
            self._ready.append(seq)
            out.kv_pulled.append(seq.req.request_id)
        self._flush(now)

    def _prefill_done(self, seq: _Seq, end: float, out: StepOutcome) -> None:
        """The step computed the whole sequence: cache its full blocks, sample a token."""
        c = seq.computed
        seq.generated += 1
        self.generation_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = end
            out.first_tokens.append(seq.req.request_id)
        del self._prefilling[seq.req.request_id]
        if seq.generated >= seq.max_out:
            self._finish(seq, end, out)
            return
        seq.state = _State.DECODE
        seq.base_tick = self._tick
        self._n_dec += 1
        self._dec_ctx += c + 1
        self._schedule_due(seq, self._tick, c, seq.generated)

    def _finish(self, seq: _Seq, end: float, out: StepOutcome) -> None:
        rid = seq.req.request_id
        self._running.pop(rid, None)
        del self._seqs[rid]
        if seq.req.lora:
            self._lora_requests -= 1
        seq.state = _State.DONE
        pinned = self.config.role == Role.PREFILL
        if pinned:
            self._pinned[rid] = seq.blocks
        else:
            self.cache.free(seq.blocks)
        seq.blocks = []
        self.finished_requests += 1
        assert seq.first_token_at is not None and seq.scheduled_at is not None
        out.finished.append(
            FinishedRequest(
                request_id=rid,
                engine=self.name,
                arrival=seq.req.arrival,
                scheduled_at=seq.scheduled_at,
                first_token_at=seq.first_token_at,
                finished_at=end,
                prompt_tokens=seq.prompt_len,
                output_tokens=seq.generated,
                cached_tokens=seq.cached_tokens,
                transferred_tokens=seq.transferred_tokens,
                preemptions=seq.preemptions,
                kv_pinned=pinned,
            )
        )

    def _flush(self, ts: float) -> None:
        if self.on_events is not None and self.cache.events:
            self.on_events(self.cache.drain_events(), ts)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: a cheap integer mixer


def _admit_order(seq: _Seq) -> int:
    return seq.admit
