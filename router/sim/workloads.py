"""Seeded synthetic workloads: the arrivals a simulation replays.

This module owns the `Arrival` / `Workload` data the runner consumes and four generators,
registered by name in `WORKLOADS`:

- ``shared-prompt``: G groups, each with its own system prompt; every request is one group's
  system prompt followed by a fresh question (RAG templates, few-shot prompts, assistants).
- ``multi-turn``: chat sessions whose history grows; turn k's prompt is turn k-1's prompt +
  turn k-1's answer tokens + new user tokens, after a think time.
- ``agentic``: agent loops; a shared tool/instruction preamble and a task, then each step
  appends the model's tool call and the tool's (long) result to the context.
- ``random``: independent prompts of random tokens; nothing to share.
- ``llmd-kv-wins``: a re-creation of llm-d's "KV-cache wins you can see" benchmark
  (inference-perf ``shared_prefix``: 150 groups × 6,000-token prefix, 5 users a group each with
  a fixed 1,200-token question, 1,000 output tokens) on its load ladder: a 50 s warm-up at
  15 req/s, then 3 → 60 req/s in 16 stages (the published stage durations). Its prompts are
  the group × user prompts, shuffled once and cycled, as inference-perf sends them.

Arrival modes:

- open loop (``concurrency=None``): requests arrive at their `time_s`, a Poisson process at
  `rate_per_s` (sessions start as a Poisson process at `rate_per_s / mean turns`). A later turn
  of a session arrives `think_s` after the previous turn's *scheduled* arrival, not after its
  answer: in an open-loop model the client does not wait for the fleet, so under overload a
  turn can arrive before its predecessor finished (it then misses the answer's KV blocks, as a
  real client that timed out and retried would).
- closed loop (``concurrency=N``): the runner keeps N requests outstanding and issues
  arrivals in index order as others finish; a turn whose `prev` turn has not completed waits
  for it and is issued `think_s` after it completes. `time_s` is ignored.

Token ids are uint32 numpy arrays drawn from one `numpy.random.Generator` seeded with `seed`,
so the same parameters and seed give identical arrivals. Each arrival also carries the answer
tokens (`output_token_ids`) that a later turn of its session replays, so an engine that
generates exactly those tokens caches the blocks the next turn will hit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

EMPTY_TOKENS = np.zeros(0, dtype=np.uint32)


@dataclass(frozen=True, slots=True)
class LengthDistribution:
    """Lognormal token counts with the given median, clipped to [low, high]; sigma 0 = fixed."""

    median: int
    sigma: float = 0.0
    low: int = 1
    high: int = 1 << 20

    def __post_init__(self) -> None:
        if self.median < 1 or self.low < 1 or self.high < self.low or self.sigma < 0:
            raise ValueError(f"invalid length distribution {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.sigma == 0.0:
            values = np.full(n, float(self.median))
        else:
            values = rng.lognormal(np.log(self.median), self.sigma, n)
        return np.clip(np.rint(values), self.low, self.high).astype(np.int64)

    def one(self, rng: np.random.Generator) -> int:
        return int(self.sample(rng, 1)[0])


@dataclass(slots=True)
class Arrival:
    """One request of a workload."""

    index: int
    #: Scheduled arrival (open loop), seconds from the workload start.
    time_s: float
    session: str
    token_ids: np.ndarray
    output_len: int
    #: The answer the next turn of the session replays (empty when no turn follows).
    output_token_ids: np.ndarray = field(default_factory=lambda: EMPTY_TOKENS)
    #: Index of the session's previous turn, -1 for a first turn.
    prev: int = -1
    #: Delay after `prev` before this turn is sent (used by the closed loop).
    think_s: float = 0.0

    @property
    def prompt_len(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class Workload:
    name: str
    arrivals: list[Arrival]
    #: None = open loop at the arrivals' `time_s`; N = closed loop with N outstanding requests.
    concurrency: int | None = None
    description: str = ""
    #: The workload's own suggested warm-up (seconds from its start excluded from figures).
    warmup_s: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(a.token_ids) for a in self.arrivals)

    @property
    def output_tokens(self) -> int:
        return sum(a.output_len for a in self.arrivals)


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True, kw_only=True)
class WorkloadParams:
    """Fields every generator takes."""

    num_requests: int = 1000
    seed: int = 0
    #: Open-loop request rate (requests/s over the whole workload).
    rate_per_s: float = 20.0
    #: Closed loop with this many outstanding requests; None = open loop.
    concurrency: int | None = None
    output: LengthDistribution = LengthDistribution(256, 0.6, 16, 2048)
    vocab_size: int = 128_000

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")


@dataclass(frozen=True, kw_only=True)
class SharedPromptParams(WorkloadParams):
    #: 128 × 6,144 tokens of distinct prefixes: ~1.8× one Llama-3.1-8B H100 pod's KV cache,
    #: ~23% of an 8-pod fleet's, so where a group's requests go decides whether they hit.
    groups: int = 128
    system_tokens: int = 6144
    question: LengthDistribution = LengthDistribution(128, 0.5, 16, 1024)
    #: Zipf exponent of group popularity; 0 = uniform.
    group_skew: float = 0.0
    output: LengthDistribution = LengthDistribution(128, 0.6, 8, 1024)
    #: 0 = every request asks a fresh question. N > 0 = each group has N users, each with one
    #: fixed question that recurs (inference-perf's ``num_prompts_per_group``): the G × N
    #: prompts are shuffled once and sent in that order, cycling (`group_skew` is then unused).
    users_per_group: int = 0
    #: Open-loop load ladder of (requests/s, seconds) stages; empty = Poisson at `rate_per_s`
    #: for `num_requests` requests. With stages, arrivals run until the last stage ends (at
    #: most `num_requests` of them).
    stages: tuple[tuple[float, float], ...] = ()
    #: Multiplies every stage's duration (< 1 subsamples the ladder to keep runs short).
    stage_scale: float = 1.0
    #: Leading seconds a report should treat as warm-up (the ladder's warm-up stage).
    warmup_s: float = 0.0


#: llm-d's published ladder: (requests/s, seconds); the first stage is the warm-up that seats
#: the 750 prompts ("KV-cache wins you can see", 2025-09-24, inference-perf config).
LLMD_LADDER: tuple[tuple[float, float], ...] = (
    (15.0, 50.0),
    (3.0, 20.0),
    (10.0, 20.0),
    (15.0, 20.0),
    (20.0, 38.0),
    (22.0, 34.0),
    (25.0, 30.0),
    (30.0, 25.0),
    (35.0, 21.0),
    (40.0, 38.0),
    (43.0, 36.0),
    (46.0, 33.0),
    (49.0, 30.0),
    (52.0, 29.0),
    (55.0, 27.0),
    (57.0, 26.0),
    (60.0, 25.0),
)


@dataclass(frozen=True, kw_only=True)
class LlmdKvWinsParams(SharedPromptParams):
    """llm-d's "KV-cache wins you can see" shape: 150 × (6,000 + 5 × 1,200) = 1.8M distinct
    prompt tokens, ~74% of 8 `qwen3-32b-h100-tp2` pods' KV cache (73.2% published)."""

    groups: int = 150
    system_tokens: int = 6000
    question: LengthDistribution = LengthDistribution(1200)
    users_per_group: int = 5
    output: LengthDistribution = LengthDistribution(1000)
    stages: tuple[tuple[float, float], ...] = LLMD_LADDER
    warmup_s: float = 50.0
    num_requests: int = 1_000_000
    vocab_size: int = 151_936


@dataclass(frozen=True, kw_only=True)
class MultiTurnParams(WorkloadParams):
    #: A system prompt every session starts with (0 = none).
    system_tokens: int = 256
    first_user: LengthDistribution = LengthDistribution(256, 0.8, 16, 4096)
    user: LengthDistribution = LengthDistribution(96, 0.8, 8, 2048)
    min_turns: int = 2
    max_turns: int = 8
    think_s_mean: float = 8.0
    #: A session ends once its next prompt would exceed this many tokens.
    max_context: int = 16_384
    output: LengthDistribution = LengthDistribution(192, 0.6, 16, 1024)


@dataclass(frozen=True, kw_only=True)
class AgenticParams(WorkloadParams):
    #: Tool definitions and instructions every agent shares.
    preamble_tokens: int = 3072
    task: LengthDistribution = LengthDistribution(512, 0.5, 64, 4096)
    tool_result: LengthDistribution = LengthDistribution(768, 0.9, 32, 8192)
    min_steps: int = 4
    max_steps: int = 16
    tool_s_mean: float = 1.5
    max_context: int = 32_768
    #: The model's tool calls are short.
    output: LengthDistribution = LengthDistribution(96, 0.6, 16, 512)
    rate_per_s: float = 10.0


@dataclass(frozen=True, kw_only=True)
class RandomParams(WorkloadParams):
    prompt: LengthDistribution = LengthDistribution(1024, 0.6, 32, 16_384)


# --------------------------------------------------------------------------- generators
def _tokens(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, n, dtype=np.uint32)


def _poisson_times(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def ladder_times(
    rng: np.random.Generator, stages: tuple[tuple[float, float], ...], limit: int
) -> np.ndarray:
    """Arrival times of a piecewise Poisson process: each (rate, seconds) stage in turn, at
    most `limit` arrivals."""
    out: list[np.ndarray] = []
    start = 0.0
    count = 0
    for rate, duration in stages:
        if rate <= 0 or duration <= 0:
            raise ValueError(f"load stage ({rate:g} req/s, {duration:g} s) must be positive")
        # Enough exponential gaps to cover the stage with overwhelming probability.
        n = int(rate * duration + 10 * np.sqrt(rate * duration) + 10)
        t = start + np.cumsum(rng.exponential(1.0 / rate, n))
        t = t[t < start + duration]
        out.append(t)
        count += len(t)
        start += duration
        if count >= limit:
            break
    times = np.concatenate(out) if out else np.zeros(0)
    return times[:limit]


def shared_prompt(p: SharedPromptParams) -> Workload:
    if p.groups < 1 or p.system_tokens < 0:
        raise ValueError("shared-prompt needs groups >= 1 and system_tokens >= 0")
    if p.users_per_group < 0:
        raise ValueError("shared-prompt needs users_per_group >= 0")
    if p.stage_scale <= 0:
        raise ValueError("stage_scale must be > 0")
    rng = np.random.default_rng(p.seed)
    systems = [_tokens(rng, p.system_tokens, p.vocab_size) for _ in range(p.groups)]
    # The ladder draws its times first (they fix how many requests there are); a constant
    # rate draws them last, after the lengths, as this generator always has (same seed →
    # same arrivals as before ladders existed).
    if p.stages:
        stages = tuple((r, d * p.stage_scale) for r, d in p.stages)
        times = ladder_times(rng, stages, p.num_requests)
        n = len(times)
    else:
        n = p.num_requests
    arrivals = []
    if p.users_per_group:
        # One fixed prompt per (group, user), shared by every recurrence (one array object,
        # so the runner keys it once); shuffled once, then cycled.
        prompts = [
            (g, u, np.concatenate((systems[g], _tokens(rng, p.question.one(rng), p.vocab_size))))
            for g in range(p.groups)
            for u in range(p.users_per_group)
        ]
        order = rng.permutation(len(prompts))
        outs = p.output.sample(rng, n)
        if not p.stages:
            times = _poisson_times(rng, n, p.rate_per_s)
        for i in range(n):
            g, u, prompt = prompts[int(order[i % len(prompts)])]
            arrivals.append(Arrival(i, float(times[i]), f"g{g}-u{u}", prompt, int(outs[i])))
        desc = (
            f"{p.groups} groups x {p.system_tokens}-token prefix, {p.users_per_group} users a "
            f"group with recurring {p.question.median}-token questions"
        )
    else:
        weights = 1.0 / np.arange(1, p.groups + 1) ** p.group_skew
        group_of = rng.choice(p.groups, n, p=weights / weights.sum())
        qlens = p.question.sample(rng, n)
        outs = p.output.sample(rng, n)
        if not p.stages:
            times = _poisson_times(rng, n, p.rate_per_s)
        for i in range(n):
            g = int(group_of[i])
            prompt = np.concatenate((systems[g], _tokens(rng, int(qlens[i]), p.vocab_size)))
            arrivals.append(Arrival(i, float(times[i]), f"g{g}-r{i}", prompt, int(outs[i])))
        desc = f"{p.groups} groups x {p.system_tokens}-token system prompt + question"
    if p.stages:
        rates = [r for r, _ in p.stages]
        desc += f", ladder {min(rates):g}-{max(rates):g} req/s"
        if p.stage_scale != 1.0:
            desc += f" (durations x{p.stage_scale:g})"
    name = "llmd-kv-wins" if isinstance(p, LlmdKvWinsParams) else "shared-prompt"
    warmup = p.warmup_s * p.stage_scale if p.stages else p.warmup_s
    return Workload(name, arrivals, p.concurrency, desc, warmup_s=warmup)


@dataclass(slots=True)
class _Turn:
    time_s: float
    session: str
    tokens: np.ndarray
    output_len: int
    answer: np.ndarray
    prev: int  # position in the generation list, -1 for a first turn
    think_s: float


def _collect_sessions(
    p: WorkloadParams,
    rng: np.random.Generator,
    mean_turns: float,
    make_session: Callable[[np.random.Generator, str, float, int], list[_Turn]],
) -> list[Arrival]:
    """Start sessions as a Poisson process until `num_requests` turns exist, then keep the
    earliest `num_requests` turns (a session's later turns are the ones cut)."""
    session_rate = p.rate_per_s / mean_turns
    turns: list[_Turn] = []
    start = 0.0
    sid = 0
    while len(turns) < p.num_requests:
        start += float(rng.exponential(1.0 / session_rate))
        turns.extend(make_session(rng, f"s{sid}", start, len(turns)))
        sid += 1
    order = sorted(range(len(turns)), key=lambda i: (turns[i].time_s, i))[: p.num_requests]
    new_index = {old: new for new, old in enumerate(order)}
    arrivals = []
    for new, old in enumerate(order):
        t = turns[old]
        # A kept turn's predecessor is earlier in time, hence kept too.
        prev = new_index[t.prev] if t.prev >= 0 else -1
        arrivals.append(
            Arrival(new, t.time_s, t.session, t.tokens, t.output_len, t.answer, prev, t.think_s)
        )
    # Answers nobody replays are dropped so they cost no memory.
    replayed = {a.prev for a in arrivals if a.prev >= 0}
    for a in arrivals:
        if a.index not in replayed:
            a.output_token_ids = EMPTY_TOKENS
    return arrivals


def _growing_session(
    rng: np.random.Generator,
    sid: str,
    start: float,
    base: int,
    head: np.ndarray,
    steps: int,
    output: LengthDistribution,
    appended: LengthDistribution,
    pause_mean_s: float,
    max_context: int,
    vocab_size: int,
) -> list[_Turn]:
    """One session whose context grows each step by the reply and an appended part (the next
    user message, or a tool result), after a pause (think time, or tool time)."""
    out: list[_Turn] = []
    context = head
    t = start
    pause = 0.0
    for k in range(steps):
        if len(context) > max_context:
            break
        out_len = output.one(rng)
        reply = _tokens(rng, out_len, vocab_size)
        prev = base + k - 1 if k else -1
        out.append(_Turn(t, sid, context, out_len, reply, prev, pause))
        pause = float(rng.exponential(pause_mean_s))
        t += pause
        context = np.concatenate((context, reply, _tokens(rng, appended.one(rng), vocab_size)))
    return out


def multi_turn(p: MultiTurnParams) -> Workload:
    if not 1 <= p.min_turns <= p.max_turns:
        raise ValueError("multi-turn needs 1 <= min_turns <= max_turns")
    rng = np.random.default_rng(p.seed)
    system = _tokens(rng, p.system_tokens, p.vocab_size)

    def session(rng: np.random.Generator, sid: str, start: float, base: int) -> list[_Turn]:
        n_turns = int(rng.integers(p.min_turns, p.max_turns + 1))
        head = np.concatenate((system, _tokens(rng, p.first_user.one(rng), p.vocab_size)))
        return _growing_session(
            rng,
            sid,
            start,
            base,
            head,
            n_turns,
            p.output,
            p.user,
            p.think_s_mean,
            p.max_context,
            p.vocab_size,
        )

    arrivals = _collect_sessions(p, rng, (p.min_turns + p.max_turns) / 2, session)
    desc = f"chat sessions of {p.min_turns}-{p.max_turns} turns, think {p.think_s_mean:g}s"
    return Workload("multi-turn", arrivals, p.concurrency, desc)


def agentic(p: AgenticParams) -> Workload:
    if not 1 <= p.min_steps <= p.max_steps:
        raise ValueError("agentic needs 1 <= min_steps <= max_steps")
    rng = np.random.default_rng(p.seed)
    preamble = _tokens(rng, p.preamble_tokens, p.vocab_size)

    def session(rng: np.random.Generator, sid: str, start: float, base: int) -> list[_Turn]:
        n_steps = int(rng.integers(p.min_steps, p.max_steps + 1))
        head = np.concatenate((preamble, _tokens(rng, p.task.one(rng), p.vocab_size)))
        return _growing_session(
            rng,
            sid,
            start,
            base,
            head,
            n_steps,
            p.output,
            p.tool_result,
            p.tool_s_mean,
            p.max_context,
            p.vocab_size,
        )

    arrivals = _collect_sessions(p, rng, (p.min_steps + p.max_steps) / 2, session)
    desc = f"agent loops of {p.min_steps}-{p.max_steps} tool calls on a shared preamble"
    return Workload("agentic", arrivals, p.concurrency, desc)


def random_prompts(p: RandomParams) -> Workload:
    rng = np.random.default_rng(p.seed)
    plens = p.prompt.sample(rng, p.num_requests)
    outs = p.output.sample(rng, p.num_requests)
    times = _poisson_times(rng, p.num_requests, p.rate_per_s)
    arrivals = [
        Arrival(i, float(times[i]), f"r{i}", _tokens(rng, int(plens[i]), p.vocab_size), int(o))
        for i, o in enumerate(outs)
    ]
    return Workload("random", arrivals, p.concurrency, "independent random prompts")


@dataclass(frozen=True, slots=True)
class WorkloadKind:
    params: type[WorkloadParams]
    build: Callable[[Any], Workload]
    summary: str


WORKLOADS: dict[str, WorkloadKind] = {
    "shared-prompt": WorkloadKind(
        SharedPromptParams, shared_prompt, "groups of requests sharing a system prompt"
    ),
    "multi-turn": WorkloadKind(MultiTurnParams, multi_turn, "chat sessions with growing history"),
    "agentic": WorkloadKind(AgenticParams, agentic, "tool-call loops on a long context"),
    "random": WorkloadKind(RandomParams, random_prompts, "random prompts, no sharing"),
    "llmd-kv-wins": WorkloadKind(
        LlmdKvWinsParams, shared_prompt, "llm-d's KV-cache wins benchmark on its 3-60 QPS ladder"
    ),
}


def make_workload(name: str, **overrides: Any) -> Workload:
    """Build a registered workload; `overrides` set fields of its params dataclass.

    Unknown names and unknown fields raise ValueError naming them.
    """
    kind = WORKLOADS.get(name)
    if kind is None:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    known = {f.name for f in fields(kind.params)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"workload {name!r} has no field(s) {', '.join(unknown)}")
    return kind.build(kind.params(**overrides))
