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
With SLOs and a rising sweep, a candidate's points after its first SLO miss are not run (they
could not be chosen), which keeps 16-GPU plans on long traces to minutes.
`sensitivity` is the tornado behind `benchmarks/plan_sensitivity.py`: the P/D gain of one
disaggregated fleet over one aggregated fleet with each engine constant scaled ±50%.
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


def fits_at(profile: Profile, tp: int) -> bool:
    """Whether the profile's model runs at this TP degree: the attention heads split evenly
    and the weights fit with room for a KV cache."""
    if tp < 1 or profile.model.heads % tp:
        return False
    try:
        at_tp = dataclasses.replace(profile, tp=tp, num_gpu_blocks_override=None)
        return at_tp.num_gpu_blocks > 0
    except ValueError:
        return False  # the weights do not fit on this many GPUs


def tp_degrees(profile: Profile, max_gpus: int) -> list[int]:
    """TP degrees of `TP_DEGREES` the profile can run at within `max_gpus`."""
    return [tp for tp in TP_DEGREES if tp <= max_gpus and fits_at(profile, tp)]


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
    stop_at_first_miss: bool = False,
) -> list[Candidate]:
    """Run every candidate at every load point (`points`: label, arrivals) and fill its
    figures, cost, SLO attainment and Pareto flag.

    `stop_at_first_miss`: the points come in rising load, so once a candidate misses the
    SLOs its later points would miss them too and are not run (they could never be its
    chosen point); its `points` then end at the first miss."""
    settings = settings or SimSettings()
    out = []
    for spec, gpus in candidates:
        fleet = parse_fleet(spec)
        cand = Candidate(spec, gpus, fleet.disaggregated)
        for label, workload in points:
            if stop_at_first_miss and cand.points and not cand.points[-1].meets_slo:
                break
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


# ------------------------------------------------------------------ sensitivity (tornado)
#: Constants the tornado varies, and where each lives: a profile's `efficiency` or `gpu`
#: section, or the profile's top level (the P/D KV link).
SENSITIVITY_CONSTANTS: tuple[tuple[str, str], ...] = (
    ("gemm_compute", "efficiency"),
    ("gemm_memory", "efficiency"),
    ("attention_compute", "efficiency"),
    ("attention_memory", "efficiency"),
    ("kernel_latency_s", "efficiency"),
    ("attention_latency_s", "efficiency"),
    ("elementwise_passes", "efficiency"),
    ("allreduce_latency_s", "efficiency"),
    ("step_overhead_s", "efficiency"),
    ("mixed_batch_layer_latency_s", "efficiency"),
    ("interconnect_bandwidth", "gpu"),
    ("kv_link_latency_s", "profile"),
    ("kv_link_bandwidth", "profile"),
)
#: Profile constants only a disaggregated fleet uses (the aggregated runs are reused).
_PD_ONLY = ("kv_link_latency_s", "kv_link_bandwidth")
#: Efficiency fractions of peak cannot pass 1: a +50% step is capped there.
_FRACTIONS = ("gemm_compute", "gemm_memory", "attention_compute", "attention_memory")


@dataclass(frozen=True, slots=True)
class SensitivityRow:
    """The P/D gain (tokens/s of the disaggregated fleet over the aggregated one, − 1) with
    one constant scaled down and up, everything else at the profile's value."""

    constant: str
    base_value: float
    low_value: float
    high_value: float
    gain_low: float
    gain_high: float

    @property
    def swing(self) -> float:
        return abs(self.gain_high - self.gain_low)

    def to_json(self) -> dict[str, Any]:
        return {
            "constant": self.constant,
            "base_value": self.base_value,
            "low_value": self.low_value,
            "high_value": self.high_value,
            "gain_low": round_figure(self.gain_low),
            "gain_high": round_figure(self.gain_high),
            "swing": round_figure(self.swing),
        }


def scale_constant(
    profile: Profile, settings: SimSettings, name: str, where: str, factor: float
) -> tuple[Profile, SimSettings, float]:
    """`profile` and `settings` with one constant multiplied by `factor` (fractions of peak
    capped at 1); returns them and the value used. `where`: "efficiency" or "gpu" (a
    section of the profile), "profile" (its top level), "link" (a `SimSettings` override of
    the profile's KV link, which must be set)."""
    if where == "link":
        current = getattr(settings, name)
        if current is None:
            raise PlanError(f"sensitivity: {name} is not set in the settings; vary the profile's")
        value = current * factor
        return profile, dataclasses.replace(settings, **{name: value}), value
    if where == "profile":
        value = getattr(profile, name) * factor
        return dataclasses.replace(profile, **{name: value}), settings, value
    if where == "efficiency":
        value = getattr(profile.efficiency, name) * factor
        if name in _FRACTIONS:
            value = min(value, 1.0)
        eff = dataclasses.replace(profile.efficiency, **{name: value})
        return dataclasses.replace(profile, efficiency=eff), settings, value
    if where == "gpu":
        value = getattr(profile.gpu, name) * factor
        gpu = dataclasses.replace(profile.gpu, **{name: value})
        return dataclasses.replace(profile, gpu=gpu), settings, value
    raise PlanError(
        f"sensitivity: unknown place {where!r} for {name} (efficiency, gpu, profile, link)"
    )


def sensitivity(
    aggregated: str,
    disaggregated: str,
    workload: Workload,
    profile: Profile,
    settings: SimSettings | None = None,
    constants: Sequence[tuple[str, str]] = SENSITIVITY_CONSTANTS,
    step: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], list[SensitivityRow]]:
    """Tornado of the P/D gain: each constant × (1 − step) and × (1 + step).

    Returns the baseline (`tokens_per_s` of both fleets, `gain`, `gain_per_gpu`) and one row
    per constant, largest swing first (ties: the listed order). Runs that a constant cannot
    change (the KV link on the aggregated fleet) are reused, not rerun."""
    if not 0 < step < 1:
        raise PlanError(f"sensitivity: the step must be between 0 and 1, got {step!r}")
    settings = settings or SimSettings()
    agg_fleet, pd_fleet = parse_fleet(aggregated), parse_fleet(disaggregated)
    if agg_fleet.disaggregated or not pd_fleet.disaggregated:
        raise PlanError(
            f"sensitivity: need an aggregated and a disaggregated fleet, got {aggregated!r} "
            f"and {disaggregated!r}"
        )
    runs: dict[tuple[str, Profile, SimSettings], float] = {}

    def tps(spec: str, prof: Profile, sett: SimSettings) -> float:
        fleet = agg_fleet if spec == aggregated else pd_fleet
        if not fleet.disaggregated:
            # The KV link does not touch an aggregated fleet: key its run without it.
            prof = dataclasses.replace(prof, **{k: getattr(profile, k) for k in _PD_ONLY})
            sett = settings
        key = (spec, prof, sett)
        if key not in runs:
            if progress is not None:
                progress(spec)
            res = run_policies(workload, fleet, [PLAN_POLICY], prof, key[2])
            runs[key] = res.policies[0].output_tokens_per_s
        return runs[key]

    def gain(prof: Profile, sett: SimSettings) -> float:
        return tps(disaggregated, prof, sett) / tps(aggregated, prof, sett) - 1.0

    base_agg = tps(aggregated, profile, settings)
    base_pd = tps(disaggregated, profile, settings)
    gpus_agg, gpus_pd = agg_fleet.gpus(profile.tp), pd_fleet.gpus(profile.tp)
    base = {
        "aggregated_tokens_per_s": base_agg,
        "disaggregated_tokens_per_s": base_pd,
        "gain": base_pd / base_agg - 1.0,
        "gain_per_gpu": (base_pd / gpus_pd) / (base_agg / gpus_agg) - 1.0,
    }
    rows = []
    for name, where in constants:
        lo_p, lo_s, lo_v = scale_constant(profile, settings, name, where, 1.0 - step)
        hi_p, hi_s, hi_v = scale_constant(profile, settings, name, where, 1.0 + step)
        _, _, base_v = scale_constant(profile, settings, name, where, 1.0)
        rows.append(SensitivityRow(name, base_v, lo_v, hi_v, gain(lo_p, lo_s), gain(hi_p, hi_s)))
    order = {name: i for i, (name, _) in enumerate(constants)}
    rows.sort(key=lambda r: (-r.swing, order[r.constant]))
    return base, rows
