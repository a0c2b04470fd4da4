"""`predicted-ttft-scorer` (kvroute's own): each pod's predicted time to first token, in seconds.

For a candidate pod the request would wait for the prefill work queued ahead of it, then run
its own prefill, on steps that also carry the pod's running decodes:

    W      = Q + U                               tokens the engine must prefill first
    Q      = inflight_prefill_tokens              router's own queued uncached tokens there
             + max(0, waiting − own) · ū           + requests the scrape shows and we did not send
                                                  (own = the router's requests there before their
                                                  first token, every replica's with shared state)
    U      = this request's uncached tokens there (prefix index, pending entries included)
    D      = max(running decodes we sent, scraped running)
    steps  = max(1, ⌈W / (C − D)⌉)                C = the engine's max batched tokens
    queued_prefill_s       = k_p · Q · t_tok
    own_prefill_s          = k_p · U · t_tok
    decode_interference_s  = k_s · steps · (t_step + D · t_dec)
    kv_pressure_s          = P · max(0, (u + W / cap − knee) / (1 − knee))
    ttft                   = the sum of the four

t_tok (seconds per prefill token), t_step (a step's floor: weights read, launch, sampling) and
t_dec (each running decode's share of a step) come from the simulator's latency model of the
profile named by `profile` (`router.sim.latency`); cap is that profile's KV capacity in
tokens, u the scraped KV utilization. Near a full cache the engine preempts or holds the
request for blocks, which `kv_pressure_s` stands for.

Learning (online, no ML library): at the first token the observed TTFT y is compared with the
TTFT predicted at the profile's rates, y0 = (Q+U)·t_tok + steps·(t_step + D·t_dec), as
predicted at the pick. Two exponentially weighted means (`decay` per observation) of
log(y / y0), each observation clipped to 4x the running mean: one over the fleet, pulled
towards the profile (log 0) by `ridge` (0.05) observations' weight, and one per pod, pulled
towards the fleet's by `podRidge` (1.0). The fleet's factor exp(mean) scales every pod's
seconds, the KV penalty's too, so it calibrates the predictions without changing a single
ranking (a profile that is wrong for the whole fleet — measured: llama-3.1-8b's on a
qwen3-32b fleet learns 2.3–4.8 — is corrected for every pod at once, an unobserved pod
included). A pod's own factor replaces the fleet's only when it is more than `podTolerance`
(1.5) times faster or slower: another GPU or TP degree is priced by what it does, while the
noise of a few dozen observations (±1.15x on an even fleet) and the drift of a saturating one
(±1.5x) leave equal pods equal. Learning only shares what the model explains: observations
from a pod with a scraped queue (`waiting`), a cache at or past `kvKnee`, or a KV penalty
predicted are skipped, since those requests also wait for blocks and preemptions the model
leaves out. (Measured before this rule, on llm-d's benchmark in the simulator: a 2-D least
squares of k_p and k_s ran to its clamps, some pods learnt 20x and others 0.2x, and the
default kept 58% of the prefix hits llm-d-precise kept 99% of.)

Score: min_cost / cost with cost = ttft + workWeight · ρ · (1 + n̄) · own_prefill_s, so the
pod with the lowest cost scores 1 and the others keep their ratios (a pod predicted twice as
slow scores 0.5). Alone in a profile with the `max-score-picker` it picks the lowest cost;
combined with other scorers it keeps its magnitudes, unlike min-max normalisation. With
workWeight 0 the cost is the predicted TTFT itself. A positive workWeight also charges the
compute a pod would spend on this request's uncached tokens, which delays the requests that
queue behind it there: TTFT alone is blind to that, so in a burst it scatters a group across
idle pods that each recompute the prefix for a TTFT only a hair lower. ρ is the share of
candidate pods with prefill work queued (the chance that added work delays anyone) and n̄
the candidates' median count of requests before their first token (`pending`: the router's
own or the scraped queue, the larger), by Little's law about how many requests arrive while
this one is prefilled and so wait for the work it adds. On a lightly loaded fleet (ρ ≈ 0) the
cost is the predicted TTFT; under load recomputing a prefix costs the fleet one own prefill
per waiting request. (With the charge capped at one own prefill, ρ ≤ 1, llm-d's benchmark in
the simulator copied prefix groups onto 1.2–5 pods once queues grew, against 1.0 for
llm-d-precise, and evicted the copies' blocks while they waited.) The figures are in the
explanation (`predicted_ttft_s`, `routing_cost_s`, `followers` = n̄ and `work_charge` =
workWeight · ρ · (1 + n̄)).

Placement (`loadHorizonS`, 30 s; 0 turns it off): a request that misses seeds its prefix on
the pod it lands on, and later requests sharing the prefix follow it there, so the cost also
carries `placement_s`, the load that pod's prefixes will draw. `placementLoad` picks how that
load is measured:

- ``inflight`` (default): reuse · seed · own_prefill_s · (L − min L) / mean L, L = the
  router's requests in flight on the pod sampled at every decision and averaged over the
  horizon (by Little's law, the traffic the prefixes it holds draw times how long each
  stays). The pod holding more than its share of the fleet's work is charged that share of
  the prefill the seed costs there.
- ``wait``: reuse · seed · (W̄ − min W̄), W̄ the pod's wait (queued prefill + decode
  interference as predicted) sampled at every decision and averaged over the horizon.

seed is the share of the prompt the request would compute there (1 for a cold prompt, near 0
for a hit, so hits stay with their holder), reuse the share of prompt tokens recent picks
found cached (a trace with little reuse keeps routing by the instant). Without a placement
term cold prefixes go to whichever pod is idle at that instant and prefix groups pile up
unevenly (measured: 11 to 28 groups of 128 on 8 pods); with ``wait`` the sampled waits are
mostly zero on a fleet below saturation and still let groups pile up (13 to 20 of 128),
while requests in flight (decodes included) are rarely zero. (A
third measure, decisions picked per pod, balanced shared-prompt as well but lost on closed-
loop sessions, where a slow pod's sessions ask less often and so look light: removed.)

Hot spots need no rule of their own: the pod holding a hot prefix has it cached (small U)
but a long queue (large Q); once its queue costs more than recomputing the prefix on an idle
pod, that pod predicts the lower TTFT and the prefix then lives on both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from router.pods import Pod
from scorers.base import (
    DetailedScorer,
    LearningPlugin,
    ParameterError,
    PluginEnv,
    SchedulingContext,
    check_params,
)

if TYPE_CHECKING:
    from router.index import BlockIndex
    from router.scheduler import Decision

DEFAULT_PROFILE = "llama-3.1-8b-h100"
#: Bounds of a learnt rate factor: a CPU engine is about a thousand times slower than an H100
#: profile, and a stub that answers at once must not make tokens free.
_K_MIN, _K_MAX = 0.01, 1e4
#: An observation further than this (in log) from the running mean is clipped to it (4x).
_CLIP = math.log(4.0)
_LOG_K_MIN, _LOG_K_MAX = math.log(_K_MIN), math.log(_K_MAX)
#: Features older than this many outstanding decisions are forgotten (a face that never
#: reports back must not grow memory).
_MAX_OPEN = 200_000
#: Decisions' worth of weight of the reuse estimate's prior (full reuse).
_REUSE_PRIOR = 300
#: What a seeding request's placement charge measures a pod's long-run load by.
_PLACEMENT_LOADS = ("inflight", "wait")


def _at_least(params: dict[str, Any], key: str, default: float, minimum: float) -> float:
    """The parameter `key` (`default` when absent); an error naming it when below `minimum`."""
    value = params.get(key)
    number = default if value is None else float(value)
    if number < minimum:
        raise ParameterError(f"predicted-ttft-scorer {key} must be >= {minimum:g}")
    return number


def _bounded_factor(log_factor: float) -> float:
    return math.exp(min(_LOG_K_MAX, max(_LOG_K_MIN, log_factor)))


@dataclass(frozen=True, slots=True)
class Rates:
    """A pod's prior rates, from the latency model of its profile."""

    token_s: float  # seconds per prefill token
    step_s: float  # floor of one engine step
    decode_s: float  # added step time per running decode
    capacity_tokens: int  # KV cache capacity


@lru_cache(maxsize=16)
def profile_rates(profile: str, max_batched_tokens: int, context: int = 2048) -> Rates:
    """t_tok, t_step, t_dec and the KV capacity of a profile (bundled name or YAML path)."""
    from router.sim.latency import LatencyModel, load_profile

    prof = load_profile(profile)
    model = LatencyModel(prof)
    step = model.decode_step_time(1, 1)
    full = model.prefill_time(max_batched_tokens)
    token = max(1e-9, (full - step) / max_batched_tokens)
    decode = max(0.0, (model.decode_step_time(64, context) - model.decode_step_time(1, context)))
    return Rates(token, step, decode / 63.0, prof.num_gpu_blocks * prof.block_size)


@dataclass(slots=True)
class _LogRatio:
    """Exponentially weighted mean of log(observed TTFT / TTFT predicted at the profile's rates).

    A mean of logs, not least squares: one observation 10x off moves it by log 10 over the
    weight, and each is clipped to `_CLIP` times the running mean besides, so a burst of
    requests held for KV blocks does not throw a pod's speed off by an order of magnitude.
    """

    mean: float = 0.0
    n: float = 0.0  # the observations' exponentially weighted count

    def observe(self, log_ratio: float, decay: float) -> None:
        if self.n > 0.0:
            log_ratio = min(self.mean + _CLIP, max(self.mean - _CLIP, log_ratio))
        self.n = decay * self.n + 1.0
        self.mean += (log_ratio - self.mean) / self.n

    def shrunk(self, towards: float, ridge: float) -> float:
        """The mean pulled towards `towards` by `ridge` observations' weight."""
        return towards + (self.mean - towards) * self.n / (self.n + ridge) if self.n else towards


@dataclass(slots=True)
class _Open:
    """What was predicted for a picked request, kept until its first token."""

    pod: str
    at: float
    prior_s: float  # the TTFT predicted at the profile's rates (factor 1)
    learnable: bool  # no part of the wait the model leaves out was foreseen


class PredictedTTFTScorer(DetailedScorer, LearningPlugin):
    """See the module docstring for the formula, the learning rule and the score."""

    PARAMS: ClassVar[dict[str, type]] = {
        "mode": str,
        "profile": str,
        "maxNumBatchedTokens": int,
        "kvPenaltyS": float,
        "kvKnee": float,
        "learn": bool,
        "decay": float,
        "ridge": float,
        "podRidge": float,
        "podTolerance": float,
        "evictionWeight": float,
        "workWeight": float,
        "loadHorizonS": float,
        "placementLoad": str,
    }

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("predicted-ttft-scorer", params, self.PARAMS)
        self.name = name
        mode = params.get("mode") or "auto"
        if mode not in ("auto", "precise", "approximate"):
            raise ParameterError(
                f"predicted-ttft-scorer mode {mode!r} is unknown (known: auto, precise, "
                "approximate)"
            )
        self.mode = env.default_prefix_mode if mode == "auto" else mode
        self.profile = params.get("profile") or DEFAULT_PROFILE
        self.max_batched = int(params.get("maxNumBatchedTokens") or 8192)
        if self.max_batched < 1:
            raise ParameterError("predicted-ttft-scorer maxNumBatchedTokens must be >= 1")
        kv_pen = params.get("kvPenaltyS")
        self.kv_penalty_s = 1.0 if kv_pen is None else float(kv_pen)
        knee = params.get("kvKnee")
        self.kv_knee = 0.9 if knee is None else float(knee)
        if not 0.0 <= self.kv_knee < 1.0 or self.kv_penalty_s < 0:
            raise ParameterError("predicted-ttft-scorer needs 0 <= kvKnee < 1 and kvPenaltyS >= 0")
        learn = params.get("learn")
        self.learn = True if learn is None else bool(learn)
        decay = params.get("decay")
        self.decay = 0.97 if decay is None else float(decay)
        ridge = params.get("ridge")
        self.ridge = 0.05 if ridge is None else float(ridge)
        self.work_weight = _at_least(params, "workWeight", 1.0, 0.0)
        self.load_horizon_s = _at_least(params, "loadHorizonS", 30.0, 0.0)
        placement = params.get("placementLoad") or "inflight"
        if placement not in _PLACEMENT_LOADS:
            raise ParameterError(
                f"predicted-ttft-scorer placementLoad {placement!r} is unknown (known: "
                f"{', '.join(_PLACEMENT_LOADS)})"
            )
        self.placement_load = placement
        self.eviction_weight = _at_least(params, "evictionWeight", 4.0, 0.0)
        self.pod_tolerance = _at_least(params, "podTolerance", 1.5, 1.0)
        self._log_tolerance = math.log(self.pod_tolerance)
        pod_ridge = params.get("podRidge")
        self.pod_ridge = 1.0 if pod_ridge is None else float(pod_ridge)
        if not 0.0 < self.decay <= 1.0 or self.ridge < 0 or self.pod_ridge < 0:
            raise ParameterError(
                "predicted-ttft-scorer needs 0 < decay <= 1, ridge >= 0 and podRidge >= 0"
            )
        try:
            self.rates = profile_rates(self.profile, self.max_batched)
        except ValueError as exc:
            raise ParameterError(f"predicted-ttft-scorer profile: {exc}") from None
        self._index = env.indexes.get(self.mode)
        self.fleet = _LogRatio()
        self._pods: dict[str, _LogRatio] = {}
        #: Per pod: EW mean of our requests' uncached tokens (sizes the scrape's extra queue).
        self._mean_tokens: dict[str, float] = {}
        self._open: dict[int, _Open] = {}
        self._last_request: object = None
        self._last: dict[str, tuple[float, float, float, int]] = {}
        #: Per pod: (time-averaged wait in seconds, when last sampled).
        self._typical: dict[str, tuple[float, float]] = {}
        #: Token-weighted share of prompts the picked pods held (EW sums: cached, prompt).
        self._reuse = [0.0, 0.0]
        #: Per pod: (time-averaged requests in flight, when last sampled).
        self._held: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------------ prediction
    def fleet_factor(self) -> float:
        """How much slower than the profile the fleet's TTFTs are (1 before any observation)."""
        return _bounded_factor(self._fleet_log())

    def factor(self, endpoint: str) -> float:
        """The pod's rate factor: the fleet's, times how much slower than the fleet the pod
        is beyond `podTolerance` (within it, the pods count as equally fast)."""
        fleet = self._fleet_log()
        pod = self._pods.get(endpoint)
        rel = pod.shrunk(fleet, self.pod_ridge) - fleet if pod is not None else 0.0
        if abs(rel) <= self._log_tolerance:
            rel = 0.0
        return _bounded_factor(fleet + rel)

    def _fleet_log(self) -> float:
        return self.fleet.shrunk(0.0, self.ridge)

    def capacity_tokens(self, pod: Pod) -> int:
        """The pod's KV cache in tokens: scraped (`cache_config_info`) where the page says,
        else the profile's."""
        m = pod.metrics
        if m.num_gpu_blocks and m.block_size:
            return m.num_gpu_blocks * m.block_size
        return self.rates.capacity_tokens

    def predict(self, ctx: SchedulingContext, pod: Pod) -> dict[str, float]:
        """The predicted TTFT of `ctx.request` on `pod` and its parts (seconds, tokens)."""
        r = self.rates
        ep = pod.endpoint
        m = pod.metrics
        own_pre = pod.inflight_prefilling
        foreign = max(0, m.waiting - own_pre)
        queued = pod.inflight_prefill_tokens
        if foreign:
            queued += int(foreign * self._mean_tokens.get(ep, ctx.prompt_tokens))
        own = ctx.uncached_tokens(ep, self.mode)
        running = max(pod.inflight_requests - own_pre, m.running, 0)
        work = queued + own
        chunk = max(1, self.max_batched - running)
        steps = max(1, math.ceil(work / chunk))
        k = self.factor(ep)
        step_base = steps * (r.step_s + running * r.decode_s)
        projected = m.kv_utilization + work / self.capacity_tokens(pod)
        kv = 0.0
        if projected > self.kv_knee and self.kv_penalty_s:
            kv = self.fleet_factor() * self.kv_penalty_s * (projected - self.kv_knee)
            kv /= 1.0 - self.kv_knee
        q_s = k * queued * r.token_s
        o_s = k * own * r.token_s
        d_s = k * step_base
        ttft = q_s + o_s + d_s + kv
        return {
            "predicted_ttft_s": ttft,
            "routing_cost_s": ttft,
            "queued_prefill_s": q_s,
            "own_prefill_s": o_s,
            "decode_interference_s": d_s,
            "kv_pressure_s": kv,
            "queued_tokens": float(queued),
            "uncached_tokens": float(own),
            "running": float(running),
            "pending": float(max(own_pre, m.waiting)),
            "rate_factor": k,
        }

    def score_details(
        self, ctx: SchedulingContext, pods: Sequence[Pod]
    ) -> tuple[list[float], list[dict[str, float]]]:
        parts = [self.predict(ctx, p) for p in pods]
        if self.work_weight and parts:
            rho = sum(1 for d in parts if d["queued_tokens"] > 0) / len(parts)
            followers = statistics.median(d["pending"] for d in parts)
            charge = self.work_weight * rho * (1.0 + followers)
            for d in parts:
                d["followers"] = followers
                d["work_charge"] = charge
                d["routing_cost_s"] = d["predicted_ttft_s"] + charge * d["own_prefill_s"]
        if self.load_horizon_s and parts:
            self._charge_placement(ctx, pods, parts)
        if self._index is not None:
            self._charge_eviction(self._index, ctx, pods, parts)
        self._last_request = ctx.request
        self._last = {}
        for p, d in zip(pods, parts, strict=True):
            # The parts at the profile's rates: one factor scales them all.
            prefill_s = (d["queued_prefill_s"] + d["own_prefill_s"]) / d["rate_factor"]
            step_s = d["decode_interference_s"] / d["rate_factor"]
            # Learn only from what the model explains. A pod with requests held in its queue
            # or a cache near full makes requests wait for what it leaves out (KV blocks,
            # preemption); a request whose tokens cost less than its step (a short hit) is
            # timed mostly by overheads it leaves out too (HTTP, tokenizing, the first
            # token's sampling). Learnt as slower rates, either would price the pods that
            # hold the most prefixes out of their hits.
            m = p.metrics
            learnable = (
                prefill_s >= step_s
                and not d["kv_pressure_s"]
                and not m.waiting
                and m.kv_utilization < self.kv_knee
            )
            prior_s = prefill_s + step_s
            self._last[p.endpoint] = (prior_s, learnable)
        times = [max(1e-6, d["routing_cost_s"]) for d in parts]
        best = min(times) if times else 0.0
        return [best / t for t in times], parts

    def _charge_placement(
        self, ctx: SchedulingContext, pods: Sequence[Pod], parts: list[dict[str, float]]
    ) -> None:
        """Charge a request that seeds a prefix with the pod's long-run load (`placementLoad`).

        A request that misses places its prefix where it lands, and the requests that share
        the prefix later follow it there, so the pod's long-run load matters more for it than
        the queue of this instant (which is empty on most pods most of the time, so a cold
        request alone would go to whichever pod happens to be idle and groups pile up
        unevenly). With `placementLoad: inflight` see `_charge_by_inflight`. With `wait`, each
        pod's wait (queued prefill + decode interference, as predicted) is sampled at every
        decision — arrivals see time averages — and averaged over
        `loadHorizonS`; the charge is how much that average exceeds the least-loaded
        candidate's, times the share of the prompt the request seeds there (1 for a cold
        prompt, near 0 for a hit, so hits stay with their holder; 0 on an idle fleet), times
        the traffic's recent reuse (`reuse`): where prompts rarely share a prefix, a seed
        draws few followers and the queue of this instant is what counts.
        """
        now = ctx.now
        horizon = self.load_horizon_s
        prompt = max(1, ctx.prompt_tokens)
        if self.placement_load == "inflight":
            self._charge_by_inflight(pods, parts, now, self.reuse(), prompt)
            return
        typical = []
        for p, d in zip(pods, parts, strict=True):
            sample = d["queued_prefill_s"] + d["decode_interference_s"]
            prev = self._typical.get(p.endpoint)
            if prev is None:
                value = sample
            else:
                w = math.exp(-max(0.0, now - prev[1]) / horizon)
                value = w * prev[0] + (1.0 - w) * sample
            self._typical[p.endpoint] = (value, now)
            typical.append(value)
        reuse = self.reuse()
        least = min(typical)
        for d, value in zip(parts, typical, strict=True):
            seed = min(1.0, d["uncached_tokens"] / prompt)
            d["typical_wait_s"] = value
            d["placement_s"] = reuse * seed * (value - least)
            d["routing_cost_s"] += d["placement_s"]

    def _charge_by_inflight(
        self,
        pods: Sequence[Pod],
        parts: list[dict[str, float]],
        now: float,
        reuse: float,
        prompt: int,
    ) -> None:
        """Placement charge from each pod's requests in flight, averaged over the horizon.

        By Little's law that average is the rate of requests the pod's prefixes draw times
        how long each stays, so a pod whose sessions run long or whose service is slow counts
        as loaded even while its instant queue is empty, and a closed-loop session on a slow
        pod (which asks less often) is not mistaken for light load.
        """
        horizon = self.load_horizon_s
        loads = []
        for p in pods:
            sample = float(p.inflight_requests)
            prev = self._held.get(p.endpoint)
            if prev is None:
                value = sample
            else:
                w = math.exp(-max(0.0, now - prev[1]) / horizon)
                value = w * prev[0] + (1.0 - w) * sample
            self._held[p.endpoint] = (value, now)
            loads.append(value)
        mean = sum(loads) / len(loads)
        least = min(loads)
        for d, load in zip(parts, loads, strict=True):
            seed = min(1.0, d["uncached_tokens"] / prompt)
            excess = (load - least) / mean if mean > 0 else 0.0
            d["inflight_share"] = load / mean if mean > 0 else 1.0
            d["placement_s"] = reuse * seed * excess * d["own_prefill_s"]
            d["routing_cost_s"] += d["placement_s"]

    def _charge_eviction(
        self,
        index: BlockIndex,
        ctx: SchedulingContext,
        pods: Sequence[Pod],
        parts: list[dict[str, float]],
    ) -> None:
        """Charge the blocks a request's uncached tokens would evict on a full cache.

        On a pod whose cache is full, every block computed there evicts a block that some
        later request would have hit (as often as the traffic reuses blocks, `reuse`), so
        recomputing a prefix on another pod costs its prefill there again later, and the
        followers of the evicted prefix wait for it. `eviction_s` = evictionWeight · reuse ·
        fullness · own_prefill_s, fullness = the blocks the pod holds in the index / its
        capacity (at most 1). On an empty fleet it is 0 and a hot prefix spreads as soon as
        its queue outweighs a recompute; on a full one a group stays with its holder until
        the holder's queue costs more than the recompute and the evictions together.
        """
        reuse = self.reuse()
        for p, d in zip(pods, parts, strict=True):
            held = index.pod_block_count(p.endpoint) * ctx.tokens_per_block
            full = min(1.0, held / self.capacity_tokens(p))
            d["cache_fullness"] = full
            d["eviction_s"] = self.eviction_weight * reuse * full * d["own_prefill_s"]
            d["routing_cost_s"] += d["eviction_s"]

    def reuse(self) -> float:
        """Share of prompt tokens the chosen pods held, over recent decisions (EW, ~500
        decisions); 1 before any. Seeding a prefix matters as much as traffic reuses them."""
        cached, prompt = self._reuse
        return cached / prompt if prompt > 0 else 1.0

    # ------------------------------------------------------------------ learning hooks
    def on_pick(self, decision: Decision, now: float) -> None:
        worker = decision.prefill or decision.target
        if decision.prompt_tokens > 0:
            if not self._reuse[1]:
                # Prior: full reuse, weighing like _REUSE_PRIOR decisions of this size. A
                # fleet's first prompts all miss, yet they are the seeds placed: reuse is
                # learnt from traffic, not from the cold start.
                self._reuse = [_REUSE_PRIOR * decision.prompt_tokens] * 2
            held = max(0, decision.prompt_tokens - decision.uncached_tokens)
            self._reuse[0] = 0.998 * self._reuse[0] + held
            self._reuse[1] = 0.998 * self._reuse[1] + decision.prompt_tokens
        feats = self._last.get(worker) if decision.request is self._last_request else None
        tokens = decision.uncached_tokens
        mean = self._mean_tokens.get(worker)
        self._mean_tokens[worker] = tokens if mean is None else 0.9 * mean + 0.1 * tokens
        if len(self._open) >= _MAX_OPEN:
            self._open.clear()
        prior_s, learnable = feats if feats is not None else (0.0, False)
        self._open[id(decision)] = _Open(worker, now, prior_s, learnable)

    def on_first_token(self, decision: Decision, now: float) -> None:
        rec = self._close(decision)
        if rec is None or not self.learn or not rec.learnable or rec.prior_s <= 0.0:
            return
        y = now - rec.at
        if y <= 0.0:
            return
        x = math.log(y / rec.prior_s)
        self.fleet.observe(x, self.decay)
        pod = self._pods.get(rec.pod)
        if pod is None:
            pod = self._pods[rec.pod] = _LogRatio()
        pod.observe(x, self.decay)

    def on_complete(self, decision: Decision, usage: dict[str, Any] | None, now: float) -> None:
        self._close(decision)

    def on_failure(self, decision: Decision, endpoint: str, now: float) -> None:
        self._close(decision)

    def _close(self, decision: Decision) -> _Open | None:
        return self._open.pop(id(decision), None)
