"""EngineDriver: runs the simulation's `Engine` against the wall clock, one asyncio task.

The engine has no clock; the driver gives it one: emulated time = wall time × `speedup` since
start. Loop: compute engine steps back to back (each starts when the previous one ends, as on a
GPU) until the next one would start more than `lookahead` past the wall clock; hand each
step's tokens to the waiting requests when the wall clock reaches the step's end; publish the
step's KV events at that moment too; sleep until the next such moment or a new request.

Why compute ahead: asyncio timers fire up to ~1 ms late and a decode step at `--speedup 10`
lasts well under 1 ms of wall time, so one timer per step would stretch every step. Step ends
are absolute deadlines, so lateness does not accumulate. `precise_timers` ends each wait with
a short blocking sleep to cut the timer slack, but only while steps last several milliseconds
of wall time and few streams are active (the sleep holds the event loop); otherwise tokens are
handed over up to half the slack early, which centres the error on zero. A request that
arrives while steps were computed ahead joins the first step not yet computed (at most
`lookahead` later than on a GPU, where it would wait for the running step to end anyway); one
that arrives while the engine clock lags behind the wall clock joins the first step that
starts after its arrival (the steps before it are computed first). If the driver falls behind
by more than `max_lag` (an overloaded CPU), the engine clock jumps forward: the modelled GPU
idles, and the lost time shows as timing error rather than as an ever-growing backlog.
Each delivered step reports its lag (wall seconds past its end deadline) to the observer's
`step_lag`, and a jump reports how late the step it skipped to was: a benchmark reads them to
tell whether the emulated timing held (the pod's `kvroute_emulator_step_lag_seconds`).

Token accounting uses the engine's public outcome only: a request decodes one token per step
from the step after its first token until it finishes (`StepOutcome.finished` gives the exact
final count). A preempted request is not visible through that API, so its tokens keep coming at
the step rate and the count is capped until its real finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from router.emulator.output import OutputPlan
from router.events.types import KVEvent
from router.sim.engine import Engine, FinishedRequest, SimRequest, StepOutcome

#: asyncio timers wake up to this late (epoll's millisecond resolution).
TIMER_SLACK_S = 0.0011
#: Keep this many finished-request timing records for `/admin/timings`.
TIMING_RECORDS = 2048
#: The blocking end-of-wait sleep holds the event loop; skip it when this many generations are
#: active (their HTTP writers need the loop more than the deadline needs the precision).
PRECISE_MAX_ACTIVE = 8


@dataclass(slots=True, eq=False)
class Generation:
    """One choice of one HTTP request, as the engine runs it and the client receives it."""

    engine_id: str
    index: int
    plan: OutputPlan
    sim: SimRequest
    job: Job
    #: Tokens the client may be sent now (advanced when a step's end time is reached).
    ready: int = 0
    #: Tokens already sent to the client (owned by the HTTP response writer).
    sent: int = 0
    finished: FinishedRequest | None = None
    arrival_clock: float = 0.0
    #: time.monotonic() of arrival and first token in this process.
    arrival_wall: float = 0.0
    first_token_wall: float | None = None
    last_token_clock: float = 0.0
    #: Set when the engine can no longer produce its tokens (aborted, pod stopping).
    failed: str | None = None


@dataclass(slots=True, eq=False)
class Job:
    """The generations of one HTTP request and the event its writer waits on."""

    request_id: str
    generations: list[Generation] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return all(g.finished is not None or g.failed for g in self.generations)


@dataclass(frozen=True, slots=True)
class TimingRecord:
    """Wall-clock view of one finished generation next to the engine model's own times.

    `*_wall` are `time.monotonic()` seconds of the pod process (compare differences only).
    """

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    arrival_wall: float
    first_token_wall: float
    finished_wall: float
    #: The engine's times for it (emulated seconds): what a GPU following the model would do.
    model_ttft_s: float
    model_e2e_s: float
    model_queue_s: float


@dataclass(slots=True)
class _StepResult:
    end: float
    tokens: list[Generation]
    finished: list[tuple[Generation, FinishedRequest]]


class DriverObserver:
    """Hooks the pod's metrics use; the default does nothing."""

    def first_token(self, gen: Generation, ttft_s: float) -> None:
        pass

    def tokens(self, gen: Generation, count: int, gap_s: float) -> None:
        pass

    def finished(self, gen: Generation, fin: FinishedRequest, e2e_s: float) -> None:
        pass

    def step_lag(self, lag_wall_s: float) -> None:
        """How late (wall seconds, >= 0) a step's tokens were handed over after its end."""


class EngineDriver:
    def __init__(
        self,
        engine: Engine,
        *,
        speedup: float = 1.0,
        lookahead_wall_s: float = 0.002,
        max_lag_wall_s: float = 0.05,
        precise_timers: bool = True,
        publish: Callable[[list[KVEvent]], None] | None = None,
        on_kv_pulled: Callable[[str], None] | None = None,
        observer: DriverObserver | None = None,
    ) -> None:
        self.engine = engine
        self.speedup = speedup
        self._lookahead = lookahead_wall_s * speedup
        self._max_lag = max(max_lag_wall_s * speedup, self._lookahead)
        # A blocking sleep to hit deadlines exactly stalls the event loop for up to the timer
        # slack; worth it only when steps last several milliseconds of wall time. Faster pods
        # deliver up to half the slack early instead (error ±0.55 ms instead of 0..+1.1 ms).
        step_wall = engine.latency.decode_step_time(1, 1024) / speedup
        self._precise = precise_timers and step_wall >= 4 * TIMER_SLACK_S
        self._half_slack = TIMER_SLACK_S / 2 * speedup
        self._publish = publish
        self._on_kv_pulled = on_kv_pulled
        self.observer = observer or DriverObserver()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._now = 0.0  # engine clock: start of the next step to compute
        self._gens: dict[str, Generation] = {}
        self._decoding: dict[str, Generation] = {}
        self._results: deque[_StepResult] = deque()
        self._events: deque[tuple[float, list[KVEvent]]] = deque()
        self._blocked = False
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.timings: deque[TimingRecord] = deque(maxlen=TIMING_RECORDS)
        #: Times the engine clock had to jump because the driver fell behind the wall clock.
        self.lag_jumps = 0

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="engine-driver")

    async def stop(self) -> None:
        self._closed = True
        self._wake()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for gen in list(self._gens.values()):
            gen.failed = "pod stopping"
            gen.job.changed.set()

    def clock(self) -> float:
        """Emulated seconds since start."""
        return (time.monotonic() - self._t0) * self.speedup

    def submit(self, job: Job) -> None:
        """Hand a job's generations to the engine. Raises ValueError if the engine refuses one
        (nothing of the job is left in the engine then)."""
        now = self.clock()
        # The request may only join a step that starts after it arrived: if the engine clock
        # lags behind the wall clock, run the steps before `now` first.
        self._advance_to(now)
        wall = time.monotonic()
        added: list[Generation] = []
        try:
            for gen in job.generations:
                gen.sim.arrival = now
                gen.arrival_clock = now
                gen.arrival_wall = wall
                self.engine.add_request(gen.sim, self._now)
                self._gens[gen.engine_id] = gen
                added.append(gen)
        except ValueError:
            for gen in added:
                self.abort(gen)
            raise
        self._blocked = False
        self._wake()

    def abort(self, gen: Generation) -> None:
        """Drop a generation the client no longer waits for (frees its blocks)."""
        if self._gens.pop(gen.engine_id, None) is None:
            return
        self._decoding.pop(gen.engine_id, None)
        self.engine.abort(gen.engine_id)
        if gen.finished is None and not gen.failed:
            gen.failed = "aborted"
        self._blocked = False
        self._wake()

    def release(self, engine_id: str) -> bool:
        """Prefill role: free the blocks a finished request kept for its decode pod."""
        try:
            self.engine.release(engine_id)
        except KeyError:
            return False
        self._blocked = False
        self._wake()
        return True

    def reset_prefix_cache(self) -> bool:
        ok = self.engine.reset_prefix_cache(max(self._now, self.clock()))
        self._flush_events(float("inf"))
        return ok

    @property
    def active(self) -> int:
        return len(self._gens)

    # ------------------------------------------------------------------ loop
    def _wake(self) -> None:
        self._woken = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_engine_events(self, events: list[KVEvent], ts: float) -> None:
        """The engine's `on_events` sink (build the Engine with it: the cache only records
        events when a sink exists at construction). Published when the clock reaches `ts`."""
        self._events.append((ts, events))

    async def _run(self) -> None:
        while not self._closed:
            self._compute_ahead()
            now = self.clock() + (0.0 if self._precise_now() else self._half_slack)
            self._deliver_due(now)
            self._flush_events(now)
            await self._sleep_until(self._next_deadline())

    def _compute_ahead(self) -> None:
        engine = self.engine
        now = self.clock()
        horizon = now + self._lookahead
        if self._now < now - self._max_lag and engine.has_work():
            # Too far behind the wall clock to catch up: the GPU "idled" meanwhile.
            due = None if self._blocked else engine.next_step_at(self._now)
            if due is not None:  # (a blocked engine waited for memory: not late)
                self.observer.step_lag(max(0.0, now - due) / self.speedup)
            self._now = now
            self.lag_jumps += 1
        while not self._blocked:
            start = engine.next_step_at(self._now)
            if start is None or start > horizon:
                return
            self._run_step(start)

    def _advance_to(self, t: float) -> None:
        """Compute every step that starts before `t`; then the engine clock is >= `t`."""
        engine = self.engine
        while not self._blocked:
            start = engine.next_step_at(self._now)
            if start is None or start >= t:
                break
            self._run_step(start)
        self._now = max(self._now, t)

    def _run_step(self, start: float) -> None:
        out = self.engine.step(start)
        if out.duration_s <= 0:
            self._now = start
            self._record(start, out)
            if self.engine.next_step_at(start) == start:
                self._blocked = True  # waiting requests that do not fit; wait for a change
            return
        self._now = start + out.duration_s
        self._record(self._now, out)

    def _record(self, end: float, out: StepOutcome) -> None:
        tokens = list(self._decoding.values()) if out.duration_s > 0 else []
        gens = self._gens
        for rid in out.first_tokens:
            gen = gens.get(rid)
            if gen is not None:
                tokens.append(gen)
                self._decoding[rid] = gen
        finished: list[tuple[Generation, FinishedRequest]] = []
        for fin in out.finished:
            gen = gens.pop(fin.request_id, None)
            if gen is not None:
                self._decoding.pop(fin.request_id, None)
                finished.append((gen, fin))
        if self._on_kv_pulled is not None:
            for rid in out.kv_pulled:
                self._on_kv_pulled(rid)
        if tokens or finished:
            self._results.append(_StepResult(end, tokens, finished))

    def _deliver_due(self, now: float) -> None:
        results = self._results
        if not results:
            return
        touched: dict[int, Job] = {}
        wall = time.monotonic()
        obs = self.observer
        # Tokens count per generation over all due steps, so a late wake-up delivers them in one
        # chunk (vLLM's output processor coalesces the same way under load).
        counts: dict[int, tuple[Generation, int]] = {}
        t0, speedup = self._t0, self.speedup
        while results and results[0].end <= now:
            res = results.popleft()
            # Step lag: wall time past the step's end deadline (early hand-overs count as 0).
            obs.step_lag(max(0.0, wall - t0 - res.end / speedup))
            for gen in res.tokens:
                g, c = counts.get(id(gen), (gen, 0))
                counts[id(gen)] = (g, c + 1)
            for gen, fin in res.finished:
                g, c = counts.get(id(gen), (gen, 0))
                counts[id(gen)] = (g, max(c, fin.output_tokens - gen.ready))
                gen.finished = fin
        for gen, c in counts.values():
            if gen.failed:
                continue
            cap = gen.plan.num_tokens if gen.finished is not None else gen.plan.num_tokens - 1
            new = min(c, cap - gen.ready)
            if new > 0:
                if gen.ready == 0:
                    gen.first_token_wall = wall
                    obs.first_token(gen, now - gen.arrival_clock)
                    if new > 1:
                        obs.tokens(gen, new - 1, (now - gen.last_token_clock) / (new - 1))
                else:
                    obs.tokens(gen, new, (now - gen.last_token_clock) / new)
                gen.ready += new
                gen.last_token_clock = now
            fin = gen.finished
            if fin is not None:
                gen.ready = gen.plan.num_tokens
                obs.finished(gen, fin, now - gen.arrival_clock)
                self.timings.append(
                    TimingRecord(
                        request_id=gen.engine_id,
                        prompt_tokens=fin.prompt_tokens,
                        cached_tokens=fin.cached_tokens,
                        output_tokens=fin.output_tokens,
                        arrival_wall=gen.arrival_wall,
                        first_token_wall=gen.first_token_wall or wall,
                        finished_wall=wall,
                        model_ttft_s=fin.ttft,
                        model_e2e_s=fin.e2e,
                        model_queue_s=fin.scheduled_at - fin.arrival,
                    )
                )
            touched[id(gen.job)] = gen.job
        for job in touched.values():
            job.changed.set()

    def _flush_events(self, now: float) -> None:
        events = self._events
        while events and events[0][0] <= now:
            _, batch = events.popleft()
            if self._publish is not None and batch:
                self._publish(batch)

    def _next_deadline(self) -> float | None:
        deadline: float | None = None
        if self._results:
            deadline = self._results[0].end
        if self._events:
            ts = self._events[0][0]
            deadline = ts if deadline is None else min(deadline, ts)
        if not self._blocked:
            start = self.engine.next_step_at(self._now)
            if start is not None:
                compute_at = start - self._lookahead
                deadline = compute_at if deadline is None else min(deadline, compute_at)
        return deadline

    async def _sleep_until(self, deadline: float | None) -> None:
        loop = self._loop
        assert loop is not None
        self._woken = False
        wall: float | None = None
        delay = 0.0
        if deadline is not None:
            # Wall deadlines on time.monotonic(): uvloop's loop.time() has 1 ms resolution.
            wall = self._t0 + deadline / self.speedup
            slack = TIMER_SLACK_S if self._precise_now() else TIMER_SLACK_S / 2
            delay = wall - time.monotonic() - slack
            if delay <= 0:
                self._finish_wait(wall)
                await asyncio.sleep(0)  # always let the HTTP writers run
                return
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = fut
        handle = loop.call_later(delay, _resolve, fut) if wall is not None else None
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()
        if wall is not None and not self._woken:
            self._finish_wait(wall)

    def _precise_now(self) -> bool:
        return self._precise and len(self._gens) <= PRECISE_MAX_ACTIVE

    def _finish_wait(self, wall: float) -> None:
        if not self._precise_now():
            return
        rem = wall - time.monotonic()
        if 0 < rem <= 1.5 * TIMER_SLACK_S:
            time.sleep(rem)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
