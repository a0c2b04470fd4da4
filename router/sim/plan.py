"""Fleet planning: which fleet shape serves a workload best for a GPU budget.

Owns the candidates (aggregated at each tensor-parallel degree the profile fits, and
prefill/decode-disaggregated fleets with a TP degree per role), their evaluation through the
simulator with kvroute's default policy on the same arrivals at every load point, the cost
per million output tokens, SLO attainment, the Pareto front and the recommendation.
`router.sim.plan_cli` is the command line (`kvroute plan`).

Per candidate and load point (a closed-loop concurrency or an open-loop rate of the sweep)
the simulator reports output tokens/s and TTFT/TPOT percentiles. A candidate's figures are
those of its best point that meets the SLOs (the most tokens/s), or of its first point when
none does (then `meets_slo` is false). Cost per million output tokens = GPUs ·
`gpu_hour_usd` / 3600 / tokens/s · 1e6. The recommendation is the cheapest candidate that
meets the SLOs; the Pareto front is the candidates no other beats on both cost and TTFT p95.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.sim.fleet import parse_fleet
from router.sim.latency import Profile
from router.sim.report import round_figure
from router.sim.runner import SimSettings, run_policies
from router.sim.workloads import Workload

#: Tensor-parallel degrees tried (those the profile's memory and heads allow).
TP_DEGREES = (1, 2, 4, 8)
#: The policy every candidate runs: the router's default.
PLAN_POLICY = "kvroute-default"


class PlanError(ValueError):
    """A plan that cannot be made; the message says which input and why."""


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_p95_s: float | None = None
    tpot_p95_s: float | None = None

    def met(self, ttft_p95_s: float, tpot_p95_s: float) -> bool:
        if self.ttft_p95_s is not None and ttft_p95_s > self.ttft_p95_s:
            return False
        return self.tpot_p95_s is None or tpot_p95_s <= self.tpot_p95_s


@dataclass(slots=True)
class PointResult:
    """One load point of one candidate."""

    load: str
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    tpot_p50_s: float
    tpot_p95_s: float
    meets_slo: bool

    def to_json(self) -> dict[str, Any]:
        return {k: round_figure(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(slots=True)
class Candidate:
    fleet: str
    gpus: int
    disaggregated: bool
    points: list[PointResult] = field(default_factory=list)
    chosen: PointResult | None = None
    usd_per_million_tokens: float = math.inf
    pareto: bool = False

    @property
    def meets_slo(self) -> bool:
        return self.chosen is not None and self.chosen.meets_slo

    def to_json(self) -> dict[str, Any]:
        c = self.chosen
        assert c is not None
        return {
            "fleet": self.fleet,
            "gpus": self.gpus,
            "disaggregated": self.disaggregated,
            "load": c.load,
            "tokens_per_s": round_figure(c.tokens_per_s),
            "tokens_per_s_per_gpu": round_figure(c.tokens_per_s / self.gpus),
            "usd_per_million_tokens": round_figure(self.usd_per_million_tokens),
            "ttft_p50_s": round_figure(c.ttft_p50_s),
            "ttft_p95_s": round_figure(c.ttft_p95_s),
            "tpot_p50_s": round_figure(c.tpot_p50_s),
            "tpot_p95_s": round_figure(c.tpot_p95_s),
            "meets_slo": c.meets_slo,
            "pareto": self.pareto,
            "points": [p.to_json() for p in self.points],
        }


def tp_degrees(profile: Profile, max_gpus: int) -> list[int]:
    """TP degrees the profile can run at within `max_gpus`: the weights fit with room for a
    KV cache, and the attention heads split evenly."""
    out = []
    for tp in TP_DEGREES:
        if tp > max_gpus or profile.model.heads % tp:
            continue
        try:
            at_tp = dataclasses.replace(profile, tp=tp, num_gpu_blocks_override=None)
            blocks = at_tp.num_gpu_blocks
        except ValueError:
            continue  # the weights do not fit on this many GPUs
        if blocks > 0:
            out.append(tp)
    return out


def candidate_fleets(
    profile: Profile, gpus: int, gpus_max: int | None = None, max_per_role: int = 16
) -> list[tuple[str, int]]:
    """(fleet spec, GPUs) of every candidate using between `gpus` and `gpus_max` GPUs.

    Aggregated: N pods at each TP degree that divides the GPU count. Disaggregated: xPyD
    with one TP degree per role, every split of the GPUs between the roles (at most
    `max_per_role` pods a role)."""
    top = gpus if gpus_max is None else gpus_max
    if gpus < 1 or top < gpus:
        raise PlanError(f"GPU budget: need 1 <= --gpus <= --gpus-max, got {gpus} and {top}")
    tps = tp_degrees(profile, top)
    if not tps:
        raise PlanError(
            f"GPU budget: {profile.name} does not fit on {top} GPU(s) at any TP degree "
            f"({', '.join(map(str, TP_DEGREES))}); raise --gpus-max or pick a smaller model"
        )
    seen: set[str] = set()
    out: list[tuple[str, int]] = []

    def add(spec: str, n: int) -> None:
        if spec not in seen:
            seen.add(spec)
            out.append((spec, n))

    for total in range(gpus, top + 1):
        for tp in tps:
            if total % tp == 0 and total // tp <= max_per_role:
                add(f"{total // tp}:tp{tp}", total)
        for tp_p in tps:
            for tp_d in tps:
                for n_p in range(1, max_per_role + 1):
                    rest = total - n_p * tp_p
                    if rest < tp_d:
                        break
                    if rest % tp_d == 0 and rest // tp_d <= max_per_role:
                        add(f"{n_p}p:tp{tp_p},{rest // tp_d}d:tp{tp_d}", total)
    if not out:
        raise PlanError(
            f"GPU budget: no fleet of {profile.name} uses between {gpus} and {top} GPUs "
            f"(TP degrees it fits at: {', '.join(map(str, tps))})"
        )
    return out


def evaluate(
    candidates: Sequence[tuple[str, int]],
    points: Sequence[tuple[str, Workload]],
    profile: Profile,
    slo: SLO,
    gpu_hour_usd: float,
    settings: SimSettings | None = None,
    progress: Callable[[str, str, int, int], None] | None = None,
) -> list[Candidate]:
    """Run every candidate at every load point (`points`: label, arrivals) and fill its
    figures, cost, SLO attainment and Pareto flag."""
    settings = settings or SimSettings()
    out = []
    for spec, gpus in candidates:
        fleet = parse_fleet(spec)
        cand = Candidate(spec, gpus, fleet.disaggregated)
        for label, workload in points:
            cb = None
            if progress is not None:
                size = len(workload.arrivals)

                def cb(
                    _policy: str, done: int, spec: str = spec, label: str = label, size: int = size
                ) -> None:
                    progress(spec, label, done, size)

            r = run_policies(workload, fleet, [PLAN_POLICY], profile, settings, cb).policies[0]
            cand.points.append(
                PointResult(
                    label,
                    r.output_tokens_per_s,
                    r.ttft_p50_s,
                    r.ttft_p95_s,
                    r.tpot_p50_s,
                    r.tpot_p95_s,
                    slo.met(r.ttft_p95_s, r.tpot_p95_s),
                )
            )
        meeting = [p for p in cand.points if p.meets_slo]
        cand.chosen = max(meeting, key=lambda p: p.tokens_per_s) if meeting else cand.points[0]
        tps = cand.chosen.tokens_per_s
        cand.usd_per_million_tokens = gpus * gpu_hour_usd / 3600.0 / tps * 1e6 if tps else math.inf
        out.append(cand)
    for c in out:
        assert c.chosen is not None
        c.pareto = not any(
            o is not c
            and o.chosen is not None
            and o.usd_per_million_tokens <= c.usd_per_million_tokens
            and o.chosen.ttft_p95_s <= c.chosen.ttft_p95_s
            and (
                o.usd_per_million_tokens < c.usd_per_million_tokens
                or o.chosen.ttft_p95_s < c.chosen.ttft_p95_s
            )
            for o in out
        )
    return out


def best(candidates: Sequence[Candidate]) -> Candidate | None:
    """The cheapest candidate that meets the SLOs (ties: lower TTFT p95, then the spec)."""
    ok = [c for c in candidates if c.meets_slo and c.chosen is not None]
    if not ok:
        return None
    return min(ok, key=lambda c: (c.usd_per_million_tokens, c.chosen.ttft_p95_s, c.fleet))  # type: ignore[union-attr]


def best_aggregated_margin(candidates: Sequence[Candidate]) -> float | None:
    """Tokens/s per GPU of the recommendation over the best aggregated candidate's (both
    meeting the SLOs); None when either is missing."""
    rec = best(candidates)
    agg = best([c for c in candidates if not c.disaggregated])
    if rec is None or agg is None or rec.chosen is None or agg.chosen is None:
        return None
    return (rec.chosen.tokens_per_s / rec.gpus) / (agg.chosen.tokens_per_s / agg.gpus)
