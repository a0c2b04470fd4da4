"""`kvroute plan`: the command line of the fleet planner (`router.sim.plan`).

    kvroute plan                                       # default workload, 8 H100s
    kvroute plan --workload random --prompt-tokens 1024 --output-tokens 1024 \\
        --concurrency 8,32,128 --profile gpt-oss-120b-b200 --gpus 4 --gpus-max 8 \\
        --candidate 1:tp4 --candidate 4p:tp1,1d:tp4 --json
    kvroute plan --trace conversation_trace.jsonl --requests 500 --gpus 16 \\
        --slo-ttft-p95 2 --slo-tpot-p95 0.05 --gpu-hour-usd 4.5 --plot charts/

Default: 1,024-token prompts with 256-token answers, a closed loop at concurrency 8, 32 and
128 per candidate, on 8 GPUs of Llama-3.1-8B on H100, no SLO.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

from router.sim.cli import (
    Progress,
    add_engine_arguments,
    add_workload_arguments,
    build_workloads,
    check_numbers,
)
from router.sim.fleet import FleetSpecError, parse_fleet
from router.sim.latency import Profile, load_profile
from router.sim.plan import (
    SLO,
    TP_DEGREES,
    Candidate,
    PlanError,
    best,
    best_aggregated_margin,
    candidate_fleets,
    evaluate,
    fits_at,
    tp_degrees,
)
from router.sim.report import plotting_unavailable
from router.sim.runner import SimSettings
from router.sim.traces import TraceError

DEFAULT_PROFILE = "llama-3.1-8b-h100"
DEFAULT_GPUS = 8
DEFAULT_CONCURRENCY = "8,32,128"
DEFAULT_PROMPT_TOKENS = 1024
DEFAULT_OUTPUT_TOKENS = 256
#: Requests a load point runs: enough for each closed-loop slot to turn over a few times.
REQUESTS_PER_SLOT = 3
MIN_REQUESTS = 64


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="which fleet (aggregated or prefill/decode, TP per role) serves a workload best",
        description=(
            "Enumerate the fleets that fit a GPU budget (aggregated at each TP degree, and "
            "xPyD with a TP degree per role), run each through the simulator with kvroute's "
            "default policy on the same arrivals, and report tokens/s, tokens/s per GPU, cost "
            "per million output tokens, TTFT/TPOT p50/p95, SLO attainment and the best fleet."
        ),
    )
    add_workload_arguments(p)
    add_engine_arguments(p)
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME",
        help=f"engine profile name or YAML path (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--gpus", type=int, default=DEFAULT_GPUS, metavar="N", help="GPU budget (default 8)"
    )
    p.add_argument(
        "--gpus-max",
        type=int,
        metavar="N",
        help="also try fleets of up to N GPUs (compare per GPU and per token cost)",
    )
    p.add_argument(
        "--candidate",
        action="append",
        metavar="SPEC",
        help="evaluate only these fleets (e.g. 1:tp4, 4p:tp1,1d:tp4); repeatable",
    )
    p.add_argument("--slo-ttft-p95", type=float, metavar="S", help="TTFT p95 target, seconds")
    p.add_argument("--slo-tpot-p95", type=float, metavar="S", help="TPOT p95 target, seconds")
    p.add_argument(
        "--gpu-hour-usd",
        type=float,
        default=1.0,
        metavar="X",
        help=(
            "price of one GPU-hour (default 1.0, so the cost column reads as GPU-hours per "
            "million output tokens; multiply by your price, or give it here)"
        ),
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.add_argument("--plot", metavar="DIR", help="write the Pareto chart PNG into DIR")
    p.add_argument(
        "--full-sweep",
        action="store_true",
        help=(
            "run every load point of every candidate (default: with an SLO and a rising "
            "sweep, a candidate's points after its first SLO miss are skipped)"
        ),
    )
    p.set_defaults(
        func=run_plan,
        pods=None,
        max_outstanding=None,
        warmup_s=None,
        router_overhead_s=SimSettings().router_overhead_s,
    )
    return p


#: The unit each positive-number flag is in, for its error message.
_POSITIVE_FLAGS = {
    "--slo-ttft-p95": "seconds (a TTFT target must be above 0)",
    "--slo-tpot-p95": "seconds (a TPOT target must be above 0)",
    "--gpu-hour-usd": "dollars a GPU-hour",
}


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise PlanError(f"{flag}: {value!r} is not a positive number of {_POSITIVE_FLAGS[flag]}")


def _explicit_candidates(specs: list[str], profile: Profile) -> list[tuple[str, int]]:
    """(spec, GPUs) of `--candidate` fleets, each role's TP checked against the profile."""
    out = []
    for spec in specs:
        fleet = parse_fleet(spec)
        for g in fleet.groups:
            tp = g.tp or profile.tp
            if g.profile is None and not fits_at(profile, tp):
                heads = profile.model.heads
                why = (
                    f"its {heads} attention heads do not split evenly over {tp} GPUs"
                    if heads % tp
                    else f"its weights leave no room for a KV cache on {tp} GPU(s)"
                )
                fits = ", ".join(f"tp{t}" for t in tp_degrees(profile, max(TP_DEGREES)))
                raise PlanError(
                    f"--candidate {spec}: {profile.name} cannot run at tp{tp}: {why} "
                    f"(it runs at {fits or 'no TP degree'})"
                )
        out.append((spec, fleet.gpus(profile.tp)))
    return out


def _apply_defaults(args: argparse.Namespace) -> None:
    if not args.trace and not args.workload:
        args.workload = ["random"]
        if args.prompt_tokens is None:
            args.prompt_tokens = DEFAULT_PROMPT_TOKENS
        if args.output_tokens is None:
            args.output_tokens = DEFAULT_OUTPUT_TOKENS
    if args.rate is None and args.concurrency is None and not args.trace:
        args.concurrency = DEFAULT_CONCURRENCY
    if args.requests is None and args.concurrency:
        top = max(int(x) for x in args.concurrency.split(",") if x.strip())
        args.requests = max(MIN_REQUESTS, REQUESTS_PER_SLOT * top)


def _label(w: Any, rate: float | None, speedup: float | None) -> str:
    if w.concurrency:
        return f"concurrency {w.concurrency}"
    if rate is not None:
        return f"rate {rate:g}/s"
    if speedup is not None:
        return f"speedup {speedup:g}"
    return w.name


def _rising(sweep: list[Any]) -> bool:
    """Whether the load rises along the sweep (one source; concurrency, rate or speedup)."""
    if len({pt.workload.name for pt in sweep}) > 1:
        return False
    loads = [pt.workload.concurrency or pt.rate_per_s or pt.speedup or 0 for pt in sweep]
    return all(a < b for a, b in itertools.pairwise(loads))


def run_plan(args: argparse.Namespace) -> int:
    progress: Progress | None = None
    try:
        if args.gpus is None or args.gpus < 1:
            raise PlanError(f"--gpus: the GPU budget must be at least 1, got {args.gpus}")
        for flag in _POSITIVE_FLAGS:
            _positive(flag, getattr(args, flag[2:].replace("-", "_")))
        check_numbers(args)
        if args.plot:
            problem = plotting_unavailable()
            if problem:
                raise PlanError(problem)
        try:
            profile = load_profile(args.profile)
        except (ValueError, OSError) as exc:
            raise PlanError(f"--profile: {exc}") from None
        _apply_defaults(args)
        if args.candidate:
            fleets = _explicit_candidates(args.candidate, profile)
        else:
            fleets = candidate_fleets(profile, args.gpus, args.gpus_max)
        sweep = build_workloads(args, args.gpus)
        points = [(_label(pt.workload, pt.rate_per_s, pt.speedup), pt.workload) for pt in sweep]
        slo = SLO(args.slo_ttft_p95, args.slo_tpot_p95)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        on_progress = None
        if show:
            total = sum(len(w.arrivals) for _, w in points) * len(fleets)
            progress = Progress(total, sys.stderr)

            def on_progress(spec: str, label: str, done: int, size: int) -> None:
                assert progress is not None
                progress.start(f"{spec} {label}")
                progress.update("", done, size)

        settings = SimSettings(
            seed=args.seed,
            router_overhead_s=args.router_overhead_s,
            cpu_kv_cache_gib=args.cpu_offload_gib,
        )
        has_slo = args.slo_ttft_p95 is not None or args.slo_tpot_p95 is not None
        early = has_slo and not args.full_sweep and _rising(sweep)
        cands = evaluate(
            fleets, points, profile, slo, args.gpu_hour_usd, settings, on_progress, early
        )
    except (PlanError, ValueError, FleetSpecError, TraceError, OSError) as exc:
        if progress is not None:
            progress.close()
        print(f"kvroute plan: error: {exc}", file=sys.stderr)
        return 2
    if progress is not None:
        progress.close()
    workload = points[0][1]
    rec = best(cands)
    margin = best_aggregated_margin(cands)
    if args.json:
        doc = {
            "workload": {"name": workload.name, "description": workload.description},
            "profile": profile.name,
            "slo": {"ttft_p95_s": args.slo_ttft_p95, "tpot_p95_s": args.slo_tpot_p95},
            "gpu_hour_usd": args.gpu_hour_usd,
            **({} if args.cpu_offload_gib is None else {"cpu_offload_gib": args.cpu_offload_gib}),
            "candidates": [c.to_json() for c in cands],
            "best": rec.fleet if rec else None,
            "margin_over_best_aggregated": None if margin is None else round(margin, 4),
        }
        print(json.dumps(doc, indent=2))
    else:
        print(format_plan(workload.description, profile.name, cands, rec, margin))
    if args.plot:
        path = write_pareto(cands, args.plot, workload.name)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def format_plan(
    description: str,
    profile: str,
    cands: list[Candidate],
    rec: Candidate | None,
    margin: float | None,
) -> str:
    head = (
        "fleet",
        "GPUs",
        "load",
        "tok/s",
        "tok/s/GPU",
        "$/M tok",
        "TTFT p50",
        "p95",
        "TPOT p50",
        "p95",
        "SLO",
        "pareto",
    )
    rows = [head]
    for c in sorted(cands, key=lambda c: c.usd_per_million_tokens):
        p = c.chosen
        assert p is not None
        rows.append(
            (
                c.fleet,
                str(c.gpus),
                p.load,
                f"{p.tokens_per_s:,.0f}",
                f"{p.tokens_per_s / c.gpus:,.0f}",
                f"{c.usd_per_million_tokens:.3f}",
                f"{p.ttft_p50_s:.3f}",
                f"{p.ttft_p95_s:.3f}",
                f"{p.tpot_p50_s:.4f}",
                f"{p.tpot_p95_s:.4f}",
                "yes" if c.meets_slo else "no",
                "*" if c.pareto else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"plan for {description} on {profile}"]
    for r in rows:
        pairs = enumerate(zip(r, widths, strict=True))
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs))
    if rec is None:
        lines.append("no candidate meets the SLOs: relax them or raise --gpus-max")
    else:
        line = f"best: {rec.fleet} ({rec.usd_per_million_tokens:.3f} $/M output tokens)"
        if margin is not None and rec.disaggregated:
            line += f", {margin:.2f}x the tokens/s per GPU of the best aggregated fleet"
        lines.append(line)
    return "\n".join(lines)


def write_pareto(cands: list[Candidate], directory: str, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    for c in cands:
        p = c.chosen
        assert p is not None
        colour = "tab:red" if c.pareto else ("tab:blue" if c.meets_slo else "tab:gray")
        ax.scatter(c.usd_per_million_tokens, p.ttft_p95_s, color=colour, s=24)
        ax.annotate(c.fleet, (c.usd_per_million_tokens, p.ttft_p95_s), fontsize=7)
    ax.set_xlabel("cost per million output tokens")
    ax.set_ylabel("TTFT p95 (s)")
    ax.set_title(f"kvroute plan — {name} (red: Pareto front)")
    ax.grid(True, alpha=0.3)
    path = out / f"plan-{name}-pareto.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
