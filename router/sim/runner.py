"""The discrete-event simulation: a workload, a fleet of modelled engines, one routing policy.

Owns the virtual clock and the event heap, and the face-like glue between the scheduler and
the engines — the same calls the proxy and ext_proc faces make:
`Scheduler.schedule` → `on_pick` → `Engine.add_request`; first token → `on_first_token`;
finish → `on_complete`.

Events (a heap of (time, sequence number, kind, payload); the sequence number makes equal
times FIFO and the run deterministic):

- arrival: build a `RoutingRequest` (token ids, precomputed block keys), schedule it, hand it
  to the target engine (or, in P/D with a remote prefill, to the prefill engine);
- step: an engine finishes its current step (its first tokens, finishes and KV pulls take
  effect now) and starts the next one. Engines may fuse consecutive pure-decode steps up to
  the next moment new work could reach them (the next open-loop arrival); in closed loop and
  on P/D decode pods that moment is the next event of any kind;
- kv-events: a batch of an engine's KV events reaches the router at the end of the step that
  caused it and is applied to the precise `BlockIndex` by the real `KVEventIngester`
  (policies reading the precise index only; the other policies' engines emit no events);
- scrape: every `scrape_interval_s` each pod's waiting / running / KV utilization is written
  into the `PodRegistry` — stale in between, as in production. The engine applies a step's
  results when the step starts, so a scrape that falls inside a step (or a fused run of
  decode steps) sees the pod as of that step's end: early by at most that step.

P/D: a request with a remote prefill runs on the prefill engine (which samples one token and
pins its blocks), then is added to the decode engine with the pair's `KVLink`; the decode
engine pulls the blocks it lacks and produces the client's first token; the prefill pod's
blocks are released when the pull completes. The hit rate counts the cache hits of the pod
that ran the prefill.

Oracle (`oracle-pooled`): every engine is given one `KVCache` whose capacity is the sum of the
fleet's GPU blocks, so all pods allocate from, and hit in, one pool — the cache a fleet would
have if any pod could use any pod's KV memory. Its hit rate bounds what placement can attain
for this arrival order; routing is `least-queue`. The runner installs the pool by replacing
each engine's `cache` and wakes pods that found the pool full when another pod frees blocks
(the engine itself only notices its own frees).

Closed loop (`Workload.concurrency`): N requests are kept outstanding, issued in index order;
a turn whose previous turn has not completed waits for it and is issued `think_s` after it
completes, holding its slot while it "thinks".

Open loop with a cap (`SimSettings.max_outstanding`, as inference-perf's worker pool and
guidellm's concurrency limit behave): a request due while the cap is reached waits on the
client, FIFO, and is sent when a request completes. TTFT counts from the send; the wait is
reported apart (`client_wait_mean_s`). Without a cap queues grow without bound under overload.

Router overhead (`SimSettings.router_overhead_s`): a request sent at t is scheduled (its
decision taken, `on_pick` called) and handed to the engine at t + overhead, so it is in every
TTFT. The default 1 ms stands for the router hop of a deployment (ext_proc gRPC round trip or
proxy hop, plus tokenizing and scoring a prompt of a few thousand tokens); 0 disables it.

Per-request log (`Simulation(..., log=callback)`): at each completion the callback gets one
plain dict with the decision (pod, prefill pod, the picked pod's predicted prefix hit, each
pod's scores) and the outcome (cached tokens, times).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router.blocks import BlockConfig, token_block_keys
from router.events.ingest import KVEventIngester
from router.events.types import KVEvent
from router.index import BlockIndex
from router.pods import MetricsSnapshot, Pod, PodRegistry, Role
from router.request import RoutingRequest
from router.scheduler import Decision, Scheduler
from router.sim.engine import (
    Engine,
    EngineConfig,
    EventSink,
    FinishedRequest,
    SimRequest,
    StepOutcome,
)
from router.sim.fleet import FleetSpec
from router.sim.kv_cache import KVCache
from router.sim.latency import LatencyModel, Profile, load_profile
from router.sim.policies import POLICIES, POOLED_POLICIES, PRECISE_POLICIES, policy_config
from router.sim.policy_files import PolicyFile
from router.sim.report import (
    PodUsage,
    PolicyResult,
    RequestRecord,
    WorkloadResult,
    attach_oracle_ratio,
    attach_ttft_floor,
    summarize,
)
from router.sim.transfer import KVLink
from router.sim.workloads import Arrival, Workload

MODEL = "sim-model"

_ARRIVE = 0
_STEP = 1
_KV = 2
_SCRAPE = 3
_ROUTE = 4

#: A policy: a built-in name (`router.sim.policies.POLICIES`) or a router config file.
PolicyRef = str | PolicyFile
#: Called with the number of requests completed so far in the running simulation.
ProgressFn = Callable[[int], None]
#: Called with one request's decision and outcome (see the module doc).
RequestLogFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class SimSettings:
    scrape_interval_s: float = 0.1
    #: P/D: remote prefill when the decode pod lacks more than this many prompt tokens.
    pd_threshold: int = 256
    #: P/D KV link latency (s) and bandwidth (bytes/s); None = the decode pod's profile's
    #: (`Profile.kv_link_latency_s`, `Profile.kv_link_bandwidth`).
    kv_link_latency_s: float | None = None
    kv_link_bandwidth_Bps: float | None = None
    #: CPU KV tier of every pod, GiB (0 = none); None = each pod's profile's
    #: (`Profile.cpu_kv_cache_gib`).
    cpu_kv_cache_gib: float | None = None
    seed: int = 0
    #: Seconds from a request's send to its decision and engine arrival (see module doc).
    router_overhead_s: float = 0.001
    #: Open loop: at most this many requests outstanding; None = no cap.
    max_outstanding: int | None = None
    #: Requests scheduled before this many seconds are left out of the figures; None = the
    #: workload's own suggestion (`Workload.warmup_s`).
    warmup_s: float | None = None

    def __post_init__(self) -> None:
        if self.scrape_interval_s <= 0:
            raise ValueError("scrape_interval_s must be > 0")
        if self.pd_threshold < 0:
            raise ValueError("pd_threshold must be >= 0")
        if self.router_overhead_s < 0:
            raise ValueError("router_overhead_s must be >= 0")
        if self.max_outstanding is not None and self.max_outstanding < 1:
            raise ValueError("max_outstanding must be >= 1")
        if self.warmup_s is not None and self.warmup_s < 0:
            raise ValueError("warmup_s must be >= 0")
        gib = self.cpu_kv_cache_gib
        if gib is not None and not (math.isfinite(gib) and gib >= 0):
            raise ValueError("cpu_kv_cache_gib must be a number of GiB >= 0")

    def warmup_for(self, workload: Workload) -> float:
        return workload.warmup_s if self.warmup_s is None else self.warmup_s


@dataclass(slots=True)
class _PodState:
    endpoint: str
    role: Role
    engine: Engine
    gpus: int
    #: Outcome of the step in progress (applied when it ends).
    pending: StepOutcome | None = None
    #: Time of the scheduled step event, None when idle.
    next_at: float | None = None
    #: Invalidates superseded step events in the heap.
    gen: int = 0
    #: Requests handed to this decode pod whose KV pull has not completed.
    pulls: int = 0


@dataclass(slots=True)
class _Flight:
    arrival: Arrival
    arrival_s: float
    decision: Decision
    keys: list[int]
    #: When the workload scheduled it (open loop: `Arrival.time_s`; closed loop: the send).
    scheduled_s: float
    #: Prompt cache hits on the prefill pod (P/D remote prefill only).
    prefill_cached: int | None = None


@dataclass(frozen=True, slots=True)
class FleetPlan:
    """Pods of a fleet with the profile each runs."""

    pods: tuple[tuple[str, Role, Profile], ...]
    block_size: int
    description: str


def plan_fleet(fleet: FleetSpec, default_profile: str | Profile) -> FleetPlan:
    """Resolve each group's profile and TP; endpoints are `pod-<role>-<i>:8000`."""
    loaded: dict[str, Profile] = {}

    def get(name: str | Profile) -> Profile:
        if isinstance(name, Profile):
            return name
        if name not in loaded:
            loaded[name] = load_profile(name)
        return loaded[name]

    pods: list[tuple[str, Role, Profile]] = []
    parts: list[str] = []
    counters: dict[Role, int] = {}
    for g in fleet.groups:
        prof = get(g.profile or default_profile)
        if g.tp is not None and g.tp != prof.tp:
            prof = dataclasses.replace(prof, tp=g.tp, num_gpu_blocks_override=None)
        parts.append(f"{g.count}x{g.role.value}[{prof.name} tp{prof.tp}]")
        for _ in range(g.count):
            i = counters.get(g.role, 0)
            counters[g.role] = i + 1
            pods.append((f"pod-{g.role.value}-{i}:8000", g.role, prof))
    sizes = {p.block_size for _, _, p in pods}
    if len(sizes) != 1:
        raise ValueError(f"fleet {fleet.text!r} mixes KV block sizes {sorted(sizes)}")
    return FleetPlan(tuple(pods), sizes.pop(), ",".join(parts))


def prompt_keys(workload: Workload, block_size: int) -> list[list[int]]:
    """Each arrival's chained block keys (what the router and the engines key prompts by).

    Arrivals sharing one token array (a recurring prompt) share one key list.
    """
    memo: dict[int, list[int]] = {}
    out = []
    for a in workload.arrivals:
        keys = memo.get(id(a.token_ids))
        if keys is None:
            keys = memo[id(a.token_ids)] = token_block_keys(a.token_ids, block_size)
        out.append(keys)
    return out


class _ClosedLoop:
    """Issues arrivals in index order keeping `concurrency` outstanding (see module doc)."""

    def __init__(self, arrivals: Sequence[Arrival], concurrency: int) -> None:
        self.arrivals = arrivals
        self.limit = concurrency
        self.outstanding = 0
        self.next_i = 0
        self.parked: dict[int, list[int]] = {}
        self.ready: list[tuple[int, float]] = []  # heap of (index, ready time)
        self.done_at: dict[int, float] = {}

    def issue(self, now: float) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        arrivals = self.arrivals
        n = len(arrivals)
        while self.outstanding < self.limit:
            while self.next_i < n and arrivals[self.next_i].prev >= 0:
                a = arrivals[self.next_i]
                done = self.done_at.get(a.prev)
                if done is None:
                    self.parked.setdefault(a.prev, []).append(self.next_i)
                else:
                    heapq.heappush(self.ready, (self.next_i, done + a.think_s))
                self.next_i += 1
            if self.ready and (self.next_i >= n or self.ready[0][0] < self.next_i):
                idx, at = heapq.heappop(self.ready)
                out.append((max(now, at), idx))
            elif self.next_i < n:
                out.append((now, self.next_i))
                self.next_i += 1
            else:
                break
            self.outstanding += 1
        return out

    def complete(self, index: int, now: float) -> None:
        self.outstanding -= 1
        self.done_at[index] = now
        for dep in self.parked.pop(index, ()):
            heapq.heappush(self.ready, (dep, now + self.arrivals[dep].think_s))


class Simulation:
    """One policy on one workload and fleet. `run()` once; it returns the policy's figures."""

    def __init__(
        self,
        workload: Workload,
        plan: FleetPlan,
        policy: PolicyRef,
        settings: SimSettings = SimSettings(),
        keys: list[list[int]] | None = None,
        progress: ProgressFn | None = None,
        log: RequestLogFn | None = None,
    ) -> None:
        if not isinstance(policy, PolicyFile) and policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.workload = workload
        self.policy = policy.name if isinstance(policy, PolicyFile) else policy
        self.settings = settings
        self._progress = progress
        self._log = log
        self._overhead = settings.router_overhead_s
        self.now = 0.0
        bs = plan.block_size
        self.keys = keys if keys is not None else prompt_keys(workload, bs)
        disaggregated = any(role is not Role.BOTH for _, role, _ in plan.pods)
        self.disaggregated = disaggregated
        self.registry = PodRegistry()
        if isinstance(policy, PolicyFile):
            config = policy.config_for(
                block_size=bs, disaggregated=disaggregated, seed=settings.seed
            )
            self.precise = policy.reads_precise_index(block_size=bs, disaggregated=disaggregated)
        else:
            config = policy_config(
                policy,
                block_size=bs,
                disaggregated=disaggregated,
                pd_threshold=settings.pd_threshold,
                seed=settings.seed,
            )
            self.precise = policy in PRECISE_POLICIES
        precise_index = BlockIndex() if self.precise else None
        self.ingester = (
            KVEventIngester(
                precise_index, BlockConfig(mode="tokens", block_size=bs), clock=self._clock
            )
            if precise_index is not None
            else None
        )
        self.pods: dict[str, _PodState] = {}
        latencies: dict[Profile, LatencyModel] = {}
        self.pooled = self.policy in POOLED_POLICIES and not isinstance(policy, PolicyFile)
        shared = None
        if self.pooled:
            total = sum(
                EngineConfig.from_profile(prof, role=role).num_gpu_blocks
                for _, role, prof in plan.pods
            )
            shared = KVCache(total, bs, emit_events=False)
        for endpoint, role, prof in plan.pods:
            if settings.cpu_kv_cache_gib is not None:
                prof = dataclasses.replace(prof, cpu_kv_cache_gib=settings.cpu_kv_cache_gib)
            self.registry.upsert(Pod(endpoint=endpoint, role=role, models=frozenset({MODEL})))
            lat = latencies.get(prof)
            if lat is None:
                lat = latencies[prof] = LatencyModel(prof)
            sink = self._sink(endpoint) if self.precise else None
            engine_config = EngineConfig.from_profile(prof, role=role)
            engine = Engine(endpoint, engine_config, lat, sink, cache=shared)
            self.pods[endpoint] = _PodState(endpoint, role, engine, prof.tp)
        self.scheduler = Scheduler(
            config,
            self.registry,
            precise_index=precise_index,
            clock=self._clock,
            seed=settings.seed,
        )
        self.links: dict[tuple[str, str], KVLink] = {}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._flights: dict[str, _Flight] = {}
        self._records: list[RequestRecord] = []
        self._closed = (
            _ClosedLoop(workload.arrivals, workload.concurrency) if workload.concurrency else None
        )
        self._next_arrival = 0  # open loop
        self._completed = 0
        #: Open loop: requests sent and not complete; those due while the cap was reached.
        self._cap = settings.max_outstanding if workload.concurrency is None else None
        self._outstanding = 0
        self._backlog: deque[int] = deque()
        #: Route times of requests sent but not yet routed (FIFO, non-decreasing).
        self._routing: deque[float] = deque()
        #: Pooled cache: pods with queued work that found no free KV blocks (woken when any
        #: pod frees blocks).
        self._stalled: dict[str, _PodState] = {}

    # ------------------------------------------------------------------ plumbing
    def _clock(self) -> float:
        return self.now

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _sink(self, endpoint: str) -> EventSink:
        def on_events(events: list[KVEvent], ts: float) -> None:
            self._push(ts, _KV, (endpoint, events))

        return on_events

    def _schedule_step(self, ps: _PodState, t: float) -> None:
        ps.gen += 1
        ps.next_at = t
        self._push(t, _STEP, (ps, ps.gen))

    def _wake(self, ps: _PodState, now: float) -> None:
        """New work reached the engine: make sure a step is due no later than it can run."""
        if ps.pending is not None:
            return  # a step is running; its end starts the next one
        nxt = ps.engine.next_step_at(now)
        if nxt is not None and (ps.next_at is None or nxt < ps.next_at):
            self._schedule_step(ps, nxt)

    # ------------------------------------------------------------------ run
    def run(self) -> PolicyResult:
        arrivals = self.workload.arrivals
        self._push(0.0, _SCRAPE, None)  # first, so requests at t=0 see a scraped fleet
        if self._closed is not None:
            for t, idx in self._closed.issue(0.0):
                self._send(idx, t, t)
        elif arrivals:
            self._push(arrivals[0].time_s, _ARRIVE, 0)
        heap = self._heap
        total = len(arrivals)
        while heap:
            t, _, kind, payload = heapq.heappop(heap)
            self.now = t
            if kind == _STEP:
                ps, gen = payload
                if gen == ps.gen:
                    self._on_step(ps, t)
            elif kind == _KV:
                assert self.ingester is not None
                self.ingester.apply_events(payload[0], payload[1])
            elif kind == _ROUTE:
                self._on_route(payload[0], payload[1], payload[2], t)
            elif kind == _ARRIVE:
                self._on_arrival(payload, t)
            elif self._completed < total:  # scrape, while anything is left to do
                if not heap:
                    raise RuntimeError(self._stuck_message())
                self._scrape(t)
                self._push(t + self.settings.scrape_interval_s, _SCRAPE, None)
        if self._completed != total:
            raise RuntimeError(
                f"policy {self.policy}: {total - self._completed} requests never finished"
            )
        usage = []
        for ps in self.pods.values():
            m = ps.engine.metrics()
            usage.append(
                PodUsage(ps.endpoint, ps.role.value, ps.gpus, m.busy_time_s, m.preemptions)
            )
        if self._progress is not None:
            self._progress(self._completed)
        return summarize(self.policy, self._records, usage, self.settings.warmup_for(self.workload))

    def _stuck_message(self) -> str:
        """Nothing is scheduled but requests remain: an engine waits for space that no
        event will free. Names the pods and their queues."""
        total = len(self.workload.arrivals)
        parts = []
        for ps in self.pods.values():
            m = ps.engine.metrics()
            parts.append(f"{ps.endpoint} waiting={m.waiting} running={m.running}")
        return (
            f"policy {self.policy}: simulation stuck at t={self.now:.3f}s with "
            f"{total - self._completed} requests unfinished ({'; '.join(parts)})"
        )

    def _scrape(self, t: float) -> None:
        for ps in self.pods.values():
            m = ps.engine.metrics()
            self.registry.set_metrics(
                ps.endpoint,
                MetricsSnapshot(
                    waiting=m.waiting,
                    running=m.running,
                    kv_utilization=m.kv_utilization,
                    block_size=ps.engine.config.block_size,
                    num_gpu_blocks=ps.engine.config.num_gpu_blocks,
                    taken_at=t,
                ),
            )

    def _until(self, ps: _PodState) -> float | None:
        """Latest start of a fused decode step: before anything could add work to `ps`.

        None (no fusion) while KV pulls are in flight: the engine checks for completed
        pulls only at step starts, and a fused step would hold them back.
        """
        if ps.pulls:
            return None
        if (
            self._closed is None
            and not self._backlog
            and not (self.disaggregated and ps.role is Role.DECODE)
        ):
            arrivals = self.workload.arrivals
            i = self._next_arrival
            nxt = arrivals[i].time_s + self._overhead if i < len(arrivals) else float("inf")
            return min(nxt, self._routing[0]) if self._routing else nxt
        return self._heap[0][0] if self._heap else float("inf")

    def _on_step(self, ps: _PodState, t: float) -> None:
        ps.next_at = None
        if ps.pending is not None:
            out = ps.pending
            ps.pending = None
            self._apply(ps, out, t)
        engine = ps.engine
        nxt = engine.next_step_at(t)
        if nxt is None:
            return
        if nxt > t:
            self._schedule_step(ps, nxt)
            return
        out = engine.step(t, self._until(ps))
        if out.duration_s <= 0.0:
            # Nothing could run: no KV space for the head of the queue (a prefill pod whose
            # blocks are pinned until decode pods pull them, or a pooled cache other pods
            # fill). Apply what happened; the pod waits for blocks to be freed.
            self._apply(ps, out, t)
            nxt = engine.next_step_at(t)
            if nxt is not None and nxt > t:
                self._schedule_step(ps, nxt)
            elif self.pooled and engine.has_work():
                self._stalled[ps.endpoint] = ps
            return
        ps.pending = out
        self._schedule_step(ps, t + out.duration_s)

    # ------------------------------------------------------------------ face glue
    def _on_arrival(self, idx: int, t: float) -> None:
        """Open loop: request `idx` is due on the client."""
        arrivals = self.workload.arrivals
        self._next_arrival = idx + 1
        if idx + 1 < len(arrivals):
            self._push(arrivals[idx + 1].time_s, _ARRIVE, idx + 1)
        if self._cap is not None and self._outstanding >= self._cap:
            self._backlog.append(idx)
            return
        self._send(idx, t, t)

    def _send(self, idx: int, t: float, scheduled: float) -> None:
        """The client sends request `idx` at `t`; the router decides `router_overhead_s`
        later (an event even when that is 0, so a completion's follow-up request is routed
        after the step that completed it has been applied)."""
        self._outstanding += 1
        at = t + self._overhead
        if self._closed is None:
            self._routing.append(at)
        self._push(at, _ROUTE, (idx, t, scheduled))

    def _on_route(self, idx: int, sent: float, scheduled: float, t: float) -> None:
        if self._closed is None:
            self._routing.popleft()
        arrivals = self.workload.arrivals
        a = arrivals[idx]
        keys = self.keys[idx]
        rid = str(idx)
        req = RoutingRequest(
            model=MODEL,
            prompt="",
            token_ids=a.token_ids,  # type: ignore[arg-type]  # numpy uint32 array
            max_tokens=a.output_len,
            session_key=a.session,
            request_id=rid,
            arrival=sent,
            block_keys=keys,
            token_count=len(a.token_ids),
        )
        decision = self.scheduler.schedule(req, now=t)
        self.scheduler.on_pick(decision, t)
        self._flights[rid] = _Flight(a, sent, decision, keys, scheduled)
        first = decision.prefill or decision.target
        ps = self.pods[first]
        ps.engine.add_request(self._sim_request(a, rid, t, keys), t)
        self._wake(ps, t)

    def _sim_request(
        self,
        a: Arrival,
        rid: str,
        arrival_s: float,
        keys: list[int],
        link: KVLink | None = None,
        source: str | None = None,
    ) -> SimRequest:
        return SimRequest(
            rid,
            a.token_ids,
            a.output_len,
            arrival=arrival_s,
            block_keys=list(keys),  # the engine extends its copy with output blocks
            output_token_ids=a.output_token_ids if len(a.output_token_ids) else None,
            kv_link=link,
            kv_source=source,
        )

    def _link(self, prefill: str, decode: str) -> KVLink:
        link = self.links.get((prefill, decode))
        if link is None:
            s = self.settings
            prof = self.pods[decode].engine.latency.profile
            latency, bandwidth = s.kv_link_latency_s, s.kv_link_bandwidth_Bps
            link = self.links[(prefill, decode)] = KVLink(
                prof.kv_link_latency_s if latency is None else latency,
                prof.kv_link_bandwidth if bandwidth is None else bandwidth,
            )
        return link

    def _apply(self, ps: _PodState, out: StepOutcome, t: float) -> None:
        if self._stalled and (out.finished or out.kv_pulled):
            # Blocks went back to the shared pool: pods that found no space may run now.
            stalled = [other for other in self._stalled.values() if other is not ps]
            for other in stalled:
                del self._stalled[other.endpoint]
                # An engine notices its own frees; another engine's frees in the shared pool
                # it has to be told of.
                other.engine.wake()
                self._wake(other, t)
        ps.pulls -= len(out.kv_pulled)
        for rid in out.kv_pulled:
            src = self._flights[rid].decision.prefill
            if src is not None:
                pre = self.pods[src]
                pre.engine.release(rid)
                self._wake(pre, t)
        for rid in out.first_tokens:
            f = self._flights[rid]
            if f.decision.target == ps.endpoint:
                self.scheduler.on_first_token(f.decision, t)
        for fr in out.finished:
            if fr.kv_pinned:
                self._hand_off(fr, t)
            else:
                self._complete(fr, t)

    def _hand_off(self, fr: FinishedRequest, t: float) -> None:
        f = self._flights[fr.request_id]
        f.prefill_cached = fr.cached_tokens
        self.scheduler.on_prefill_done(f.decision, t)
        target = self.pods[f.decision.target]
        link = self._link(fr.engine, target.endpoint)
        target.engine.add_request(
            self._sim_request(f.arrival, fr.request_id, f.arrival_s, f.keys, link, fr.engine), t
        )
        target.pulls += 1
        self._wake(target, t)

    def _complete(self, fr: FinishedRequest, t: float) -> None:
        f = self._flights.pop(fr.request_id)
        cached = fr.cached_tokens if f.prefill_cached is None else f.prefill_cached
        record = RequestRecord(
            f.arrival.index,
            f.arrival_s,
            fr.first_token_at,
            fr.finished_at,
            fr.prompt_tokens,
            cached,
            fr.output_tokens,
            f.scheduled_s,
        )
        self._records.append(record)
        if self._log is not None:
            self._log(self._log_entry(f, record))
        usage = {
            "prompt_tokens": fr.prompt_tokens,
            "completion_tokens": fr.output_tokens,
            "cached_tokens": cached,
        }
        self.scheduler.on_complete(f.decision, usage, t)
        self._completed += 1
        self._outstanding -= 1
        if self._progress is not None and not self._completed & 63:
            self._progress(self._completed)
        if self._closed is not None:
            self._closed.complete(f.arrival.index, t)
            for at, idx in self._closed.issue(t):
                self._send(idx, at, at)
        elif self._backlog:
            idx = self._backlog.popleft()
            self._send(idx, t, self.workload.arrivals[idx].time_s)

    def _log_entry(self, f: _Flight, rec: RequestRecord) -> dict[str, Any]:
        d = f.decision
        scheduled = rec.arrival_s if rec.scheduled_s is None else rec.scheduled_s
        main = d.results.get(d.profile)
        pods = []
        predicted = 0.0
        for s in main.pods if main else []:
            pods.append(
                {
                    "endpoint": s.endpoint,
                    "prefix_hit": round(s.prefix_hit, 6),
                    "scores": {k: round(v, 6) for k, v in s.scores.items()},
                    "total": round(s.total, 6),
                }
            )
            if s.endpoint == (d.prefill or d.target):
                predicted = s.prefix_hit
        return {
            "policy": self.policy,
            "workload": self.workload.name,
            "index": rec.index,
            "session": f.arrival.session,
            "pod": d.target,
            "prefill_pod": d.prefill,
            "scheduled_s": round(scheduled, 6),
            "sent_s": round(rec.arrival_s, 6),
            "first_token_s": round(rec.first_token_s, 6),
            "finish_s": round(rec.finish_s, 6),
            "ttft_s": round(rec.first_token_s - rec.arrival_s, 6),
            "prompt_tokens": rec.prompt_tokens,
            "output_tokens": rec.output_tokens,
            "cached_tokens": rec.cached_tokens,
            "predicted_hit": round(predicted, 6),
            "predicted_uncached_tokens": d.uncached_tokens,
            "actual_hit": round(rec.cached_tokens / rec.prompt_tokens, 6)
            if rec.prompt_tokens
            else 0.0,
            "warmup": scheduled < self.settings.warmup_for(self.workload),
            "pods": pods,
        }


def run_policies(
    workload: Workload,
    fleet: FleetSpec,
    policies: Sequence[PolicyRef],
    profile: str | Profile,
    settings: SimSettings = SimSettings(),
    progress: Callable[[str, int], None] | None = None,
    log: RequestLogFn | None = None,
) -> WorkloadResult:
    """Run every policy on the same arrivals and fleet; figures in the order given.

    `progress(policy, completed)` is called as each policy's requests complete; `log` gets
    every request's decision and outcome."""
    plan = plan_fleet(fleet, profile)
    keys = prompt_keys(workload, plan.block_size)
    results = []
    for p in policies:
        name = p.name if isinstance(p, PolicyFile) else p
        cb = (lambda done, name=name: progress(name, done)) if progress else None
        results.append(Simulation(workload, plan, p, settings, keys, cb, log).run())
    out = WorkloadResult(
        workload.name,
        plan.description,
        workload.description,
        results,
        workload.concurrency,
        max_outstanding=settings.max_outstanding if workload.concurrency is None else None,
        warmup_s=settings.warmup_for(workload),
    )
    attach_oracle_ratio(out)
    attach_ttft_floor(out, _alone_prefill(plan), settings.router_overhead_s)
    return out


def _alone_prefill(plan: FleetPlan) -> Callable[[int, int], float]:
    """Prefill time of a prompt alone on an idle pod (chunked as the engine chunks it), on
    the fastest profile of the fleet's prefilling pods."""
    configs = []
    for _, role, prof in plan.pods:
        if role != Role.DECODE:
            chunk = EngineConfig.from_profile(prof).max_num_batched_tokens
            configs.append((LatencyModel(prof), chunk))

    def alone(prompt: int, cached: int) -> float:
        cached = min(cached, max(0, prompt - 1))  # the engine computes at least one token
        best = math.inf
        for model, chunk in configs:
            t, done = 0.0, cached
            while done < prompt:
                n = min(chunk, prompt - done)
                t += model.prefill_time(n, done)
                done += n
            best = min(best, t)
        return best

    return alone
