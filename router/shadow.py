"""Shadow policies: what other routing policies would have done with each live request.

`shadow_policies: [NAME, ...]` (the `kvroute simulate --policies` names) gives the live
scheduler a `ShadowSet`: one `Scheduler` per policy, built from the policy's config
(`router.sim.policies.policy_config`) and sharing the live scheduler's pod registry, keyer and
prefix indexes, so it reads the very state the live decision read. After each live decision
the scheduler runs every shadow's `schedule()` on the same request, `now` and subset hint and
keeps what it would have picked (`router.scheduler.ShadowPick`) on `Decision.shadows`. A
shadow's decision is never committed: no in-flight charges, no last-pick times, no
approximate-index inserts, no pending entries; the shadow schedulers run without pending
entries of their own, so their `schedule()` does not even expire the live ones.

What a shadow's state follows. A shadow answers "on this fleet, as it is, where would policy
X send this request?", so everything it reads about the fleet is the live fleet's:

- Load (in-flight requests, queued prefill tokens, scraped metrics) is the shared registry,
  charged by the live picks only.
- Prefix indexes are the live ones. The approximate index holds the LIVE picks (an
  `llm-d-default` shadow reads where the live policy sent earlier requests, not where it
  would have sent them itself: after a while its own picks would have placed the prefixes
  differently, which a shadow cannot know). When the fleet has no KV-event feed, a policy
  that reads the precise index reads the approximate one instead: the router's record of
  its picks is then the best knowledge of what the pods hold.
- Plugins with private learned state are fed the live decisions through the hooks
  (`on_pick`, `on_first_token`, `on_complete`, `on_failure`): `sglang-cache-aware`'s
  character tree records where the live policy sent each prompt, `dynamo-kv-cost`'s active
  blocks the live requests in flight, `predicted-ttft-scorer` learns from the live requests'
  observed TTFTs, `vllm-kv-aware`'s speculative inserts go to the live pick (from the block
  where the shadow's own best match ended). Those hooks touch only the plugin's own state.
- A picker's own turn (`round-robin-picker`'s cursor, the random pickers' generator) is the
  shadow's own: it advances with the shadow's picks.

Stats per policy (`ShadowStats`, plain Python; `router.shadow_metrics` exports them):
requests scored, picks agreeing with the live one (same target and same prefill pod), the
prefix tokens its pick held (`captured_tokens`: the live decision's `prefix_tokens` of the
shadow's prefilling pod, the same yardstick as the live captured figure), its predicted TTFT
(from its own `predicted-ttft-scorer`, else the live policy's prediction for that pod), and
refusals by error code. A shadow that refuses a request (a `RequestError`) or fails never
affects the live request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.config import RouterConfig
from router.request import RequestError, RoutingRequest
from router.scheduler import Decision, PDProfileHandler, Scheduler, ShadowPick
from router.sim.policies import policy_config
from scorers.base import LearningPlugin

log = logging.getLogger(__name__)

#: The scorer whose details carry a TTFT prediction per pod (`scorers.predicted_ttft`).
PREDICTED_TTFT = "predicted-ttft-scorer"


@dataclass(slots=True)
class ShadowStats:
    """Running totals of one shadow policy (or of the live policy, as the yardstick)."""

    requests: int = 0
    #: Picks equal to the live decision's (same target, same prefill pod).
    agreements: int = 0
    #: Prompt tokens of the requests it scored (refused ones included).
    prompt_tokens: int = 0
    #: Cached prefix tokens of the pods it picked (live default index, at decision time).
    captured_tokens: int = 0
    predicted_ttft_sum_s: float = 0.0
    predicted_ttft_count: int = 0
    #: Refusals by `RequestError.code` ("internal" for a shadow that raised otherwise).
    errors: dict[str, int] = field(default_factory=dict)
    #: Time spent scheduling it (seconds).
    seconds: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        req = self.requests
        return {
            "requests": req,
            "agreements": self.agreements,
            "agreement_rate": self.agreements / req if req else None,
            "prompt_tokens": self.prompt_tokens,
            "captured_tokens": self.captured_tokens,
            "captured_rate": (
                self.captured_tokens / self.prompt_tokens if self.prompt_tokens else None
            ),
            "predicted_ttft_mean_s": (
                self.predicted_ttft_sum_s / self.predicted_ttft_count
                if self.predicted_ttft_count
                else None
            ),
            "errors": dict(self.errors),
            "mean_cost_us": self.seconds / req * 1e6 if req else None,
        }


@dataclass(slots=True)
class ShadowPolicy:
    name: str
    scheduler: Scheduler
    learners: list[LearningPlugin]
    #: Its profile has a `predicted-ttft-scorer` (its decisions carry TTFT predictions).
    predicts: bool = False
    stats: ShadowStats = field(default_factory=ShadowStats)


def prediction(decision: Decision, endpoint: str) -> float | None:
    """`decision`'s predicted TTFT for `endpoint` (a `predicted-ttft-scorer`'s details in any
    of its profiles), or None when none of its scorers predicts one."""
    for result in decision.results.values():
        for pod in result.pods:
            if pod.endpoint != endpoint or not pod.details:
                continue
            for parts in pod.details.values():
                value = parts.get("predicted_ttft_s")
                if value is not None:
                    return value
    return None


def _predicts(config: RouterConfig) -> bool:
    return any(p.type == PREDICTED_TTFT for p in config.plugins)


def _reads(sched: Scheduler) -> set[str]:
    """The prefix-index modes `sched`'s plugins (and P/D handler) read."""
    modes = {getattr(p, "mode", None) for p in sched.plugins.values()}
    if isinstance(sched.handler, PDProfileHandler):
        modes.add(sched.handler.mode)
    modes.discard(None)
    return modes  # type: ignore[return-value]


class ShadowSet:
    """The shadow schedulers of one live scheduler, and their stats (see the module doc)."""

    def __init__(self, live: Scheduler, names: Sequence[str], *, precise_fed: bool) -> None:
        self.live_stats = ShadowStats()
        self.precise_fed = precise_fed
        self.policies: list[ShadowPolicy] = []
        handler = live.handler
        pd = isinstance(handler, PDProfileHandler)
        #: Precise index the shadows read: the live feed, else the record of live picks.
        precise = live.precise_index if precise_fed else live.approx_index
        #: Some shadow reads a prefix index / would keep pending entries in the precise one.
        self.reads_index = False
        self.wants_pending = False
        for name in names:
            base = policy_config(
                name,
                block_size=live.config.blocks.block_size,
                disaggregated=pd,
                pd_threshold=handler.threshold if isinstance(handler, PDProfileHandler) else 256,
            )
            config = dataclasses.replace(
                base,
                pods=(),
                blocks=live.config.blocks,
                request=live.config.request,
                saturation=live.config.saturation,
                prefix_index=dataclasses.replace(base.prefix_index, pending_ttl_s=None),
                seed=live.config.seed,
                source=f"<shadow policy {name}>",
            )
            sched = Scheduler(
                config,
                live.registry,
                precise_index=precise,
                keyer=live.keyer,
                approx_index=live.approx_index,
                clock=live.clock,
                max_fallbacks=0,
            )
            reads = _reads(sched)
            self.reads_index |= bool(reads)
            if precise_fed and "precise" in reads and base.prefix_index.pending_ttl_s is not None:
                self.wants_pending = True
            learners = [p for p in sched.plugins.values() if isinstance(p, LearningPlugin)]
            predicts = _predicts(config)
            if not predicts:  # only its pick is read: skip the per-pod score records
                for profile in sched.profiles.values():
                    profile.scored = False
            self.policies.append(ShadowPolicy(name, sched, learners, predicts))
        self.live_predicts = _predicts(live.config)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.policies]

    # ------------------------------------------------------------------ scoring
    def run(
        self,
        req: RoutingRequest,
        decision: Decision,
        subset: Collection[str] | None,
        now: float,
        live_hits: dict[str, dict[str, float]] | None = None,
    ) -> list[ShadowPick]:
        """Schedule `req` under every shadow policy (after the live `decision`) and count.
        `live_hits`: the live decision's index lookups (mode → pod → matched blocks), which
        the shadows reuse where they read the same index; the shadows share theirs too."""
        prefix = decision.prefix_tokens
        prompt = decision.prompt_tokens
        live = self.live_stats
        live.requests += 1
        live.agreements += 1
        live.prompt_tokens += prompt
        live_worker = decision.prefill or decision.target
        live.captured_tokens += prefix.get(live_worker, 0)
        live.seconds += decision.elapsed_s
        live_predicts = self.live_predicts
        own = prediction(decision, live_worker) if live_predicts else None
        if own is not None:
            live.predicted_ttft_sum_s += own
            live.predicted_ttft_count += 1
        picks: list[ShadowPick] = []
        hits = self._shared_hits(live_hits) if req.block_keys else None
        for sp in self.policies:
            st = sp.stats
            st.requests += 1
            st.prompt_tokens += prompt
            t0 = time.perf_counter()
            try:
                # Only a keyed shadow shares lookups: an unkeyed one would record empty ones.
                shared = hits if sp.scheduler.needs_keys else None
                d = sp.scheduler.schedule(req, subset=subset, now=now, prefix_hits=shared)
            except RequestError as e:
                st.seconds += time.perf_counter() - t0
                st.errors[e.code] = st.errors.get(e.code, 0) + 1
                picks.append(ShadowPick(sp.name, None, 0, None, e.code))
                continue
            except Exception:  # a shadow's bug must not fail live traffic
                st.seconds += time.perf_counter() - t0
                if not st.errors.get("internal"):
                    log.exception("shadow policy %s failed on a request", sp.name)
                st.errors["internal"] = st.errors.get("internal", 0) + 1
                picks.append(ShadowPick(sp.name, None, 0, None, "internal"))
                continue
            st.seconds += time.perf_counter() - t0
            worker = d.prefill or d.target
            agrees = d.target == decision.target and d.prefill == decision.prefill
            captured = prefix.get(worker, 0)
            ttft = prediction(d, worker) if sp.predicts else None
            if ttft is None and live_predicts:
                ttft = own if worker == live_worker else prediction(decision, worker)
            st.agreements += agrees
            st.captured_tokens += captured
            if ttft is not None:
                st.predicted_ttft_sum_s += ttft
                st.predicted_ttft_count += 1
            picks.append(ShadowPick(sp.name, worker, captured, ttft, None, agrees))
        return picks

    def _shared_hits(
        self, live_hits: dict[str, dict[str, float]] | None
    ) -> dict[str, dict[str, float]]:
        """The lookups one request's shadows share, keyed by the shadows' modes: every
        shadow maps a mode to the same index, so one shadow's lookup serves the next. Seeded
        from the live lookups of the same index: the approximate one is shared; the shadows'
        precise index is the live one when fed (same lookup, same silent-pod merge), else the
        approximate one (whose pods are never marked silent)."""
        out: dict[str, dict[str, float]] = {}
        if not live_hits:
            return out
        approx = live_hits.get("approximate")
        if approx is not None:
            out["approximate"] = approx
        precise = live_hits.get("precise") if self.precise_fed else approx
        if precise is not None:
            out["precise"] = precise
        return out

    # ------------------------------------------------------------------ learning
    # The live decision's hooks, forwarded to the shadows' learning plugins so their private
    # state follows the live fleet (module docstring). They touch only the plugins' state.
    def on_pick(self, decision: Decision, now: float) -> None:
        for sp in self.policies:
            for p in sp.learners:
                p.on_pick(decision, now)

    def on_first_token(self, decision: Decision, now: float) -> None:
        for sp in self.policies:
            for p in sp.learners:
                p.on_first_token(decision, now)

    def on_complete(self, decision: Decision, usage: dict[str, Any] | None, now: float) -> None:
        for sp in self.policies:
            for p in sp.learners:
                p.on_complete(decision, usage, now)

    def on_failure(self, decision: Decision, endpoint: str, now: float) -> None:
        for sp in self.policies:
            for p in sp.learners:
                p.on_failure(decision, endpoint, now)

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict[str, Any]:
        """Plain JSON: the live yardstick and each shadow's totals and rates."""
        return {
            "live": self.live_stats.as_dict(),
            "shadows": {sp.name: sp.stats.as_dict() for sp in self.policies},
        }
