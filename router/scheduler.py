"""The scheduler: request → filters → weighted scorers → picker → decision, plus the hooks.

Owns profiles (filters + weighted scorers + picker), profile handlers (single, P/D), the
decision and its explanation, and the router-side accounting every face shares: in-flight
requests and uncached prefill tokens per pod, last-pick times, and the approximate prefix index
fed by the scheduler's own picks. It does no I/O and never reads a clock of its own unless the
caller gives none (the simulator passes virtual time).

Faces call `schedule()` and then, as the request proceeds, `on_pick`, `on_first_token`,
`on_complete` and `on_failure`; plugins that learn see only those hooks.

The precise (KV-event) index cannot see a prefill that is queued or running: its blocks are
announced only when computed. So `on_pick` records each decision there as pending (see
`router.index`) when a plugin reads that index; the engine's `BlockStored` confirms it, and
the pending entry expires `prefix_index.pending_ttl_s` after the prefill ran, or
`pending_max_s` after the pick, or goes at once when the request fails.

A pod whose KV-event feed is silent (`BlockIndex.silent_pods`, set by `router.feeds`) has a
stale precise record; for it, precise lookups also read the approximate index of the
router's own picks (LRU-bounded, recorded whenever a plugin reads either index) and take the
longer match, until its events resume and the precise index (refilled by replay) is the
truth again.

Several replicas (`router.shared_state`): the hooks tell an optional `observer` each change
they make (charges, approximate inserts and removals, pending inserts); other replicas' changes
come back through the index methods and `add_remote_inflight`, which tell it nothing.

A scorer may offer `score_details(ctx, pods) -> (scores, details)`, one dict of named figures
per pod (e.g. a predicted TTFT and its parts); the profile then calls it instead of `score`
and the decision carries the details into its explanation.

With `shadow_policies:` each decision also carries what other policies would have picked on
the same state (`router.shadow`; run after the live decision, outside its `elapsed_s`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from router.blocks import BlockKeyer, estimate_tokens
from router.config import RouterConfig
from router.index import BlockIndex, PendingEntry
from router.pods import Pod, PodRegistry
from router.request import RequestError, RoutingRequest
from scorers.base import (
    Filter,
    LearningPlugin,
    Picker,
    PluginEnv,
    SchedulingContext,
    Scorer,
    check_params,
)
from scorers.filters import HealthyFilter, ModelFilter
from scorers.pickers import MaxScorePicker
from scorers.registry import build_plugin, plugin_kind

if TYPE_CHECKING:
    from router.shadow import ShadowSet


@dataclass(slots=True)
class PodScore:
    endpoint: str
    #: Fraction of the request's blocks the pod holds as a consecutive prefix (default index).
    prefix_hit: float
    scores: dict[str, float]
    total: float
    #: Scorer name → named figures behind its score (only scorers with `score_details`).
    details: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(slots=True)
class ProfileResult:
    profile: str
    #: Candidates that passed the filters, best first per the picker.
    ranked: list[str]
    pods: list[PodScore]


@dataclass(slots=True)
class ShadowPick:
    """What a shadow policy (`router.shadow`) would have done with a live request."""

    policy: str
    #: The pod it would have sent the request to (its prefill pod in P/D); None when it
    #: would have refused the request (`error` says why).
    target: str | None
    #: Prompt tokens `target` held as a cached prefix (the live decision's default index).
    captured_tokens: int
    #: Its TTFT prediction for `target`, where the policy predicts one (predicted-ttft).
    predicted_ttft_s: float | None = None
    error: str | None = None
    #: Same target and same prefill pod as the live decision.
    agrees: bool = False


@dataclass(slots=True)
class Decision:
    request: RoutingRequest
    #: Where the request goes (the decode pod in P/D).
    target: str
    #: Next-best pods, for retries (primary first in `endpoints`).
    fallbacks: list[str]
    #: Pod that prefills remotely in P/D, or None.
    prefill: str | None
    profile: str
    results: dict[str, ProfileResult]
    #: Uncached prompt tokens on the pod that will prefill (prefill pod, else target).
    uncached_tokens: int
    prompt_tokens: int
    #: Scheduling time in seconds (for metrics).
    elapsed_s: float = 0.0
    #: Pod → prompt tokens it held as a cached prefix at decision time (the default index;
    #: pods holding none are absent). Empty when the request was not keyed.
    prefix_tokens: dict[str, int] = field(default_factory=dict)
    #: What each configured shadow policy would have picked; empty without shadows.
    shadows: list[ShadowPick] = field(default_factory=list)
    _charged: list[tuple[str, int]] = field(default_factory=list)
    _pending: list[PendingEntry] = field(default_factory=list)
    _done: bool = False

    @property
    def endpoints(self) -> list[str]:
        return [self.target, *self.fallbacks]

    @property
    def available_tokens(self) -> int:
        """Reuse *available*: the longest cached prefix any pod held, in prompt tokens."""
        return max(self.prefix_tokens.values(), default=0)

    @property
    def captured_tokens(self) -> int:
        """Reuse *captured*: the cached prefix of the pod that prefills (prefill pod, else
        target), in prompt tokens."""
        return self.prefix_tokens.get(self.prefill or self.target, 0)

    def explain(self) -> dict[str, Any]:
        """The decision as plain JSON data (the `kvroute explain --json` shape)."""
        main = self.results.get(self.profile)
        pods = []
        for s in main.pods if main else []:
            pod: dict[str, Any] = {
                "endpoint": s.endpoint,
                "prefix_hit": round(s.prefix_hit, 6),
                "scores": {k: round(v, 6) for k, v in s.scores.items()},
                "total": round(s.total, 6),
            }
            if s.details:
                pod["details"] = {
                    name: {k: round(v, 6) for k, v in parts.items()}
                    for name, parts in s.details.items()
                }
            pods.append(pod)
        out: dict[str, Any] = {
            "pick": self.target,
            "prefill_pick": self.prefill,
            "fallbacks": self.fallbacks,
            "profile": self.profile,
            "prompt_tokens": self.prompt_tokens,
            "uncached_tokens": self.uncached_tokens,
            "pods": pods,
        }
        if self.prefill is not None or len(self.results) > 1:
            out["profiles"] = {
                name: {
                    "ranked": r.ranked,
                    "pods": [{"endpoint": s.endpoint, "total": round(s.total, 6)} for s in r.pods],
                }
                for name, r in self.results.items()
            }
        if self.shadows:
            out["captured_tokens"] = self.captured_tokens
            out["shadows"] = self.shadow_report()
        return out

    def shadow_report(self) -> list[dict[str, Any]]:
        """Each shadow policy's pick as plain JSON (explain, the debug header)."""
        return [
            {
                "policy": sp.policy,
                "pick": sp.target,
                "captured_tokens": sp.captured_tokens,
                "agrees": sp.agrees,
                "predicted_ttft_s": (
                    None if sp.predicted_ttft_s is None else round(sp.predicted_ttft_s, 6)
                ),
                **({"error": sp.error} if sp.error else {}),
            }
            for sp in self.shadows
        ]


class StateObserver(Protocol):
    """Told of every change the hooks make to the router's own state, so another replica can
    apply it (`router.shared_state`). Called on the hot path: record, never block."""

    def charged(self, pod: str, requests: int, tokens: int, prefilling: int = 0) -> None:
        """In-flight requests / uncached prefill tokens / requests before their first token
        on `pod` moved by these (signed)."""

    def indexed(self, pod: str, keys: Sequence[int]) -> None:
        """The approximate index recorded `keys` on `pod` (a pick)."""

    def unindexed(self, pod: str, keys: Sequence[int]) -> None:
        """The approximate index forgot `keys` on `pod` (a failed request)."""

    def pending(self, pod: str, keys: Sequence[int]) -> None:
        """The precise index recorded `keys` on `pod` as pending (a speculative insert)."""


class Profile:
    """Filters, weighted scorers and one picker, run in that order."""

    def __init__(
        self,
        name: str,
        filters: list[Filter],
        scorers: list[tuple[Scorer, float]],
        picker: Picker,
        prefix_mode: str,
    ) -> None:
        self.name = name
        self.filters = filters
        self.scorers = scorers
        self.picker = picker
        self.prefix_mode = prefix_mode
        #: Keep each candidate's scores in the result (explain, details); a shadow policy
        #: that needs only its ranking turns it off.
        self.scored = True

    def run(self, ctx: SchedulingContext, pods: list[Pod]) -> ProfileResult:
        for f in self.filters:
            pods = f.filter(ctx, pods)
            if not pods:
                return ProfileResult(self.name, [], [])
        n = len(pods)
        totals = [0.0] * n
        per_scorer: list[tuple[str, list[float]]] = []
        details: list[tuple[str, list[dict[str, float]]]] = []
        for scorer, weight in self.scorers:
            explain = getattr(scorer, "score_details", None)
            if explain is not None:
                values, parts = explain(ctx, pods)
                details.append((scorer.name, parts))
            else:
                values = scorer.score(ctx, pods)
            per_scorer.append((scorer.name, values))
            if weight:
                for i in range(n):
                    totals[i] += weight * values[i]
        order = self.picker.pick(ctx, pods, totals)
        if not self.scored:
            return ProfileResult(self.name, [pods[i].endpoint for i in order], [])
        nkeys = len(ctx.keys)
        hits = ctx.prefix_hits(self.prefix_mode) if nkeys else {}
        scored = [
            PodScore(
                p.endpoint,
                hits.get(p.endpoint, 0.0) / nkeys if nkeys else 0.0,
                {name: values[i] for name, values in per_scorer},
                totals[i],
                {name: parts[i] for name, parts in details},
            )
            for i, p in enumerate(pods)
        ]
        return ProfileResult(self.name, [pods[i].endpoint for i in order], scored)


class SingleProfileHandler:
    def __init__(self, params: dict[str, Any], profiles: dict[str, Profile]) -> None:
        check_params("single-profile-handler", params, {"profile": str})
        self.profile = params.get("profile") or next(iter(profiles))
        if self.profile not in profiles:
            raise ValueError(f"single-profile-handler: no profile '{self.profile}'")

    def run(
        self, sched: Scheduler, ctx: SchedulingContext, pods: list[Pod], profile: str | None
    ) -> tuple[str, dict[str, ProfileResult], str | None]:
        name = profile or self.profile
        result = sched.profiles[name].run(ctx, pods)
        return name, {name: result}, None


class PDProfileHandler:
    """Run the decode profile; when the prompt's uncached part on the chosen decode pod is
    above `threshold` tokens (0 = always), also run the prefill profile for a remote prefill."""

    def __init__(self, params: dict[str, Any], profiles: dict[str, Profile], mode: str) -> None:
        check_params(
            "pd-profile-handler",
            params,
            {"threshold": int, "decodeProfile": str, "prefillProfile": str, "mode": str},
        )
        t = params.get("threshold")
        self.threshold = 256 if t is None else int(t)
        self.decode = params.get("decodeProfile") or "decode"
        self.prefill = params.get("prefillProfile") or "prefill"
        for p in (self.decode, self.prefill):
            if p not in profiles:
                raise ValueError(f"pd-profile-handler: no profile '{p}' in schedulingProfiles")
        m = params.get("mode") or "auto"
        self.mode = mode if m == "auto" else m

    def run(
        self, sched: Scheduler, ctx: SchedulingContext, pods: list[Pod], profile: str | None
    ) -> tuple[str, dict[str, ProfileResult], str | None]:
        decode = sched.profiles[self.decode].run(ctx, pods)
        results = {self.decode: decode}
        if not decode.ranked:
            return self.decode, results, None
        uncached = ctx.uncached_tokens(decode.ranked[0], self.mode)
        if self.threshold and uncached <= self.threshold:
            return self.decode, results, None
        pre = sched.profiles[self.prefill].run(ctx, pods)
        results[self.prefill] = pre
        return self.decode, results, (pre.ranked[0] if pre.ranked else None)


class Scheduler:
    def __init__(
        self,
        config: RouterConfig,
        registry: PodRegistry | None = None,
        precise_index: BlockIndex | None = None,
        keyer: BlockKeyer | None = None,
        approx_index: BlockIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        max_fallbacks: int = 2,
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry if registry is not None else PodRegistry()
        if registry is None:
            for pod in config.pods:
                self.registry.upsert(pod)
        self.keyer = keyer if keyer is not None else BlockKeyer.from_config(config.blocks)
        pi = config.prefix_index
        self.precise_index = (
            precise_index if precise_index is not None else BlockIndex(tier_weights=pi.tier_weights)
        )
        #: Passed in by a scheduler that reads another's record of picks (a shadow policy, a
        #: reloaded config), else its own.
        self.approx_index = (
            approx_index
            if approx_index is not None
            else BlockIndex(
                capacity_per_pod=pi.lru_capacity_per_pod,
                ttl_s=pi.ttl_s,
                tier_weights=pi.tier_weights,
            )
        )
        self.indexes = {"precise": self.precise_index, "approximate": self.approx_index}
        if pi.mode == "auto":
            self.default_prefix_mode = "precise" if precise_index is not None else "approximate"
        else:
            self.default_prefix_mode = pi.mode
        for index in self.indexes.values():
            self.registry.on_remove(index.drop_pod)
        self.rng = random.Random(seed if seed is not None else config.seed)
        self.max_fallbacks = max_fallbacks
        env = PluginEnv(self.registry, self.default_prefix_mode, self.indexes)
        self.plugins: dict[str, Any] = {}
        for spec in config.plugins:
            if plugin_kind(spec.type) is not None:
                self.plugins[spec.name] = build_plugin(
                    spec.type, spec.name, dict(spec.parameters), env
                )
        self.profiles: dict[str, Profile] = {}
        for ps in config.profiles:
            filters, scorers, picker = [], [], None
            for ref in ps.plugins:
                plugin = self.plugins[ref.ref]
                kind = plugin_kind(next(p.type for p in config.plugins if p.name == ref.ref))
                if kind == "filter":
                    filters.append(plugin)
                elif kind == "scorer":
                    scorers.append((plugin, ref.weight))
                else:
                    picker = plugin
            self.profiles[ps.name] = Profile(
                ps.name,
                filters,
                scorers,
                picker or MaxScorePicker("max-score-picker", {}, env),
                self.default_prefix_mode,
            )
        hspec = config.handler
        if hspec.type == "pd-profile-handler":
            self.handler: SingleProfileHandler | PDProfileHandler = PDProfileHandler(
                dict(hspec.parameters), self.profiles, self.default_prefix_mode
            )
        else:
            self.handler = SingleProfileHandler(dict(hspec.parameters), self.profiles)
        self._learners = [p for p in self.plugins.values() if isinstance(p, LearningPlugin)]
        index_readers = {getattr(p, "mode", None) for p in self.plugins.values()}
        if isinstance(self.handler, PDProfileHandler):
            index_readers.add(self.handler.mode)
        index_readers.discard(None)
        #: Some plugin reads a prefix index, so requests need block keys (and token counts).
        #: Without one (e.g. a round-robin profile) a request is never tokenized.
        self.needs_keys = bool(index_readers)
        #: Picks are recorded in the approximate index when a plugin reads it, and in precise
        #: mode too: it is the fallback record of a pod whose feed goes silent.
        self._record_approx = bool(index_readers & {"approximate", "precise"})
        #: Decisions are recorded in the precise index as pending when something reads it.
        self._pending_ttl = pi.pending_ttl_s if "precise" in index_readers else None
        self._pending_max = pi.pending_max_s
        self._model_filter = ModelFilter("model-filter", {}, env)
        self._healthy_filter = HealthyFilter("healthy-filter", {}, env)
        #: Told of the hooks' state changes (shared state); None = this replica alone.
        self.observer: StateObserver | None = None
        #: `shadow_policies:` run on each request (`router.shadow`); None = none configured.
        self.shadows: ShadowSet | None = None
        if config.shadow_policies:
            from router.shadow import ShadowSet  # imports this module

            self.shadows = ShadowSet(
                self, config.shadow_policies, precise_fed=precise_index is not None
            )
            # Shadows score captured tokens with the live `prefix_tokens`: key every request,
            # and keep the record of picks the shadows (and `prefix_tokens`) may read.
            self.needs_keys = True
            self._record_approx = (
                self._record_approx
                or self.shadows.reads_index
                or self.default_prefix_mode == "approximate"
            )
            if self._pending_ttl is None and self.shadows.wants_pending:
                self._pending_ttl = pi.pending_ttl_s

    # ------------------------------------------------------------------ scheduling
    def schedule(
        self,
        req: RoutingRequest,
        profile: str | None = None,
        subset: Collection[str] | None = None,
        now: float | None = None,
        *,
        prefix_hits: dict[str, dict[str, float]] | None = None,
    ) -> Decision:
        """Pick the pod(s) for `req`. Raises `RequestError` 404 (no pod serves the model),
        503 (none healthy / none in `subset` / a profile's filters leave none), 429 (sheddable
        and every candidate saturated). `prefix_hits`: index mode → lookups of `req`'s keys
        on this scheduler's indexes, made already (shadows reuse the live decision's) and
        filled in with those this call makes."""
        t0 = time.perf_counter()
        if now is None:
            now = self.clock()
        if self._pending_ttl is not None:
            self.precise_index.expire_pending(now)
        if profile is not None and profile not in self.profiles:
            raise RequestError(400, f"unknown scheduling profile '{profile}'", "unknown_profile")
        if self.needs_keys:
            keys = self.keyer.keys(req)
            prompt_tokens = self.keyer.token_count(req)
        else:
            keys = []
            prompt_tokens = estimate_tokens(req)
        ctx = SchedulingContext(
            request=req,
            now=now,
            keys=keys,
            prompt_tokens=prompt_tokens,
            tokens_per_block=self.config.blocks.tokens_per_block,
            rng=self.rng,
            _lookup=lambda mode: self._longest_prefix(mode, keys),
        )
        if prefix_hits is not None:
            ctx._hits = prefix_hits
        pods = self._model_filter.filter(ctx, self.registry.all())
        if not pods:
            raise RequestError(
                404, f"model '{req.model}' is not served by any pod", "model_not_found"
            )
        if subset is not None:
            allowed = set(subset)
            pods = [p for p in pods if p.endpoint in allowed]
            if not pods:
                raise RequestError(503, "no pod of the subset hint serves the request", "no_pod")
        pods = self._healthy_filter.filter(ctx, pods)
        if not pods:
            raise RequestError(503, f"no healthy pod serves model '{req.model}'", "no_healthy_pod")
        if req.sheddable and all(self._saturated(p) for p in pods):
            raise RequestError(429, "all pods are saturated; sheddable request refused", "shed")
        if profile is not None and isinstance(self.handler, PDProfileHandler):
            profile = None  # P/D chooses its own profiles
        name, results, prefill = self.handler.run(self, ctx, pods, profile)
        main = results[name]
        if not main.ranked:
            raise RequestError(
                503, f"no pod passes the filters of profile '{name}'", "no_candidate"
            )
        target = main.ranked[0]
        mode = self.default_prefix_mode
        uncached = ctx.uncached_tokens(prefill or target, mode)
        prefix_tokens: dict[str, int] = {}
        if keys:
            tpb, total = ctx.tokens_per_block, ctx.prompt_tokens
            for ep, matched in ctx.prefix_hits(mode).items():
                if matched > 0:
                    prefix_tokens[ep] = min(total, int(matched * tpb))
        decision = Decision(
            request=req,
            target=target,
            fallbacks=main.ranked[1 : 1 + self.max_fallbacks],
            prefill=prefill,
            profile=name,
            results=results,
            uncached_tokens=uncached,
            prompt_tokens=ctx.prompt_tokens,
            elapsed_s=time.perf_counter() - t0,
            prefix_tokens=prefix_tokens,
        )
        if self.shadows is not None:  # after elapsed_s: shadows keep their own time
            decision.shadows = self.shadows.run(req, decision, subset, now, ctx._hits)
        return decision

    def _longest_prefix(self, mode: str, keys: Sequence[int]) -> dict[str, float]:
        """The `mode` index's match per pod; for a silent pod in precise mode, the longer of
        its precise match and the router's own record of its picks."""
        result = self.indexes[mode].longest_prefix(keys)
        silent = self.precise_index.silent_pods
        if silent and mode == "precise":
            own = self.approx_index.longest_prefix(keys)
            for pod in silent:
                n = own.get(pod)
                if n is not None and n > result.get(pod, 0.0):
                    result[pod] = n
        return result

    def prepare(self, req: RoutingRequest) -> None:
        """Do the request-only part of scheduling ahead: tokenize and key the prompt (kept on
        the request, so `schedule` does not redo it). The costly step for long prompts in
        token mode; a face may run it in a worker thread (one at a time: the tokenizer's
        prefix cache is not thread-safe) to keep its event loop free."""
        if self.needs_keys:
            self.keyer.keys(req)
            self.keyer.token_count(req)

    @property
    def tokenizes(self) -> bool:
        """True when `prepare` runs a tokenizer (worth moving off an event loop)."""
        return self.needs_keys and self.keyer.tokenizer is not None

    def _saturated(self, pod: Pod) -> bool:
        s = self.config.saturation
        m = pod.metrics
        return m.waiting > s.queue_threshold or m.kv_utilization > s.kv_threshold

    # ------------------------------------------------------------------ hooks
    def on_pick(self, decision: Decision, now: float | None = None) -> None:
        """The face committed to `decision`: account the load and learn from it."""
        if now is None:
            now = self.clock()
        worker = decision.prefill or decision.target
        for ep in {decision.target, worker}:
            pod = self.registry.get(ep)
            if pod is not None:
                pod.last_picked_at = now
        obs = self.observer
        target = self.registry.get(decision.target)
        if target is not None:
            target.inflight_requests += 1
            if obs is not None:
                obs.charged(decision.target, 1, 0)
        wpod = self.registry.get(worker)
        if wpod is not None:
            wpod.inflight_prefill_tokens += decision.uncached_tokens
            wpod.inflight_prefilling += 1
            decision._charged.append((worker, decision.uncached_tokens))
            if obs is not None:
                obs.charged(worker, 0, decision.uncached_tokens, 1)
        if self._record_approx and decision.request.block_keys:
            keys = decision.request.block_keys
            self.approx_index.add_blocks(decision.target, keys, now=now)
            if decision.prefill:
                self.approx_index.add_blocks(decision.prefill, keys, now=now)
            if obs is not None:
                obs.indexed(decision.target, keys)
                if decision.prefill:
                    obs.indexed(decision.prefill, keys)
        if self._pending_ttl is not None and decision.request.block_keys:
            keys = decision.request.block_keys
            until = now + self._pending_max
            for ep in dict.fromkeys((worker, decision.target)):
                entry = self.precise_index.add_pending(ep, keys, until)
                if entry is not None:
                    decision._pending.append(entry)
                    if obs is not None:
                        obs.pending(ep, entry.keys)
        for p in self._learners:
            p.on_pick(decision, now)
        if self.shadows is not None:
            self.shadows.on_pick(decision, now)

    def on_first_token(self, decision: Decision, now: float | None = None) -> None:
        """Prefill is done: release the uncached tokens charged to the prefilling pod."""
        if now is None:
            now = self.clock()
        self._release_prefill(decision)
        self._settle_pending(decision, now)
        for p in self._learners:
            p.on_first_token(decision, now)
        if self.shadows is not None:
            self.shadows.on_first_token(decision, now)

    def on_prefill_done(self, decision: Decision, now: float | None = None) -> None:
        """P/D: the remote prefill leg ended (its KV is ready to pull, or it failed): the
        prefill pod's charge goes now, not at the client's first token, which also waits for
        the transfer and the decode pod's queue. Faces that cannot see the leg (the ext_proc
        picker, where the sidecar runs it) leave it to `on_first_token`."""
        self._release_prefill(decision)
        if decision.prefill is not None:
            self._settle_pending(decision, self.clock(), decision.prefill)

    def on_complete(
        self, decision: Decision, usage: dict[str, Any] | None = None, now: float | None = None
    ) -> None:
        if now is None:
            now = self.clock()
        self._settle_pending(decision, now)
        if self._finish(decision):
            for p in self._learners:
                p.on_complete(decision, usage, now)
            if self.shadows is not None:
                self.shadows.on_complete(decision, usage, now)

    def on_failure(self, decision: Decision, endpoint: str, now: float | None = None) -> None:
        """The request failed on `endpoint`: release its load and forget what it would have
        cached there."""
        if now is None:
            now = self.clock()
        if self._record_approx and decision.request.block_keys:
            self.approx_index.remove_keys(endpoint, decision.request.block_keys)
            if self.observer is not None:
                self.observer.unindexed(endpoint, decision.request.block_keys)
        for entry in decision._pending:
            if entry.pod == endpoint:
                self.precise_index.release_pending(entry)
        if self._finish(decision):
            for p in self._learners:
                p.on_failure(decision, endpoint, now)
            if self.shadows is not None:
                self.shadows.on_failure(decision, endpoint, now)

    def _settle_pending(self, decision: Decision, now: float, pod: str | None = None) -> None:
        """The prefill ran (on `pod`, or everywhere): its KV events are due within
        `pending_ttl_s`, so the pending entries need live no longer than that."""
        ttl = self._pending_ttl
        if ttl is None:
            return
        until = now + ttl
        index = self.precise_index
        for entry in decision._pending:
            if entry.live and entry.expires_at > until and (pod is None or entry.pod == pod):
                index.set_pending_expiry(entry, until)

    def _release_prefill(self, decision: Decision) -> None:
        obs = self.observer
        for ep, tokens in decision._charged:
            pod = self.registry.get(ep)
            if pod is not None:
                pod.inflight_prefill_tokens = max(0, pod.inflight_prefill_tokens - tokens)
                pod.inflight_prefilling = max(0, pod.inflight_prefilling - 1)
            if obs is not None:
                obs.charged(ep, 0, -tokens, -1)
        decision._charged.clear()

    def _finish(self, decision: Decision) -> bool:
        if decision._done:
            return False
        decision._done = True
        self._release_prefill(decision)
        pod = self.registry.get(decision.target)
        if pod is not None:
            pod.inflight_requests = max(0, pod.inflight_requests - 1)
            if self.observer is not None:
                self.observer.charged(decision.target, -1, 0)
        return True

    def add_remote_inflight(
        self, endpoint: str, requests: int, tokens: int, prefilling: int = 0
    ) -> None:
        """Add another replica's in-flight change on `endpoint` (signed; `router.shared_state`
        applies what the other replicas publish). Not reported to the observer."""
        pod = self.registry.get(endpoint)
        if pod is not None:
            pod.inflight_requests = max(0, pod.inflight_requests + requests)
            pod.inflight_prefill_tokens = max(0, pod.inflight_prefill_tokens + tokens)
            pod.inflight_prefilling = max(0, pod.inflight_prefilling + prefilling)

    # ------------------------------------------------------------------ helpers
    @property
    def records_pending(self) -> bool:
        """True when picks are recorded in the precise index as pending."""
        return self._pending_ttl is not None

    @property
    def records_approx(self) -> bool:
        """True when picks are recorded in the approximate index."""
        return self._record_approx

    def prefix_index(self) -> BlockIndex:
        """The index plugins read by default (what `explain` seeds and events feed)."""
        return self.indexes[self.default_prefix_mode]

    def profile_names(self) -> Sequence[str]:
        return list(self.profiles)
