"""`kvroute simulate`: argument parsing and the run of every (fleet, workload, policy).

Owns the command line of the simulator face and its embedded default experiment (8 pods of
Llama-3.1-8B on H100; the multi-turn chat and shared-prompt workloads, 1,000 requests each).
`router/cli.py` wires `add_parser` and `run_simulate` into the `kvroute` command.

Examples::

    kvroute simulate                                   # the default experiment, as a table
    kvroute simulate --workload shared-prompt --pods 4 --policies round-robin,prefix-precise
    kvroute simulate --trace conversation_trace.jsonl --requests 5000 --pods 16 \
        --profile llama-3.3-70b-fp8-h100-tp4 --json
    kvroute simulate --workload random --prompt-tokens 1024 --output-tokens 1024 \
        --concurrency 8,16,32,64,128 --profile gpt-oss-120b-b200 \
        --fleet 1:tp4 --fleet 4p:tp1,1d:tp4 --policies round-robin --plot charts/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.sim.fleet import FleetSpecError, parse_fleet
from router.sim.policies import POLICIES
from router.sim.report import WorkloadResult, format_table, to_json, write_plots
from router.sim.runner import SimSettings, run_policies
from router.sim.traces import TraceError, trace_workload
from router.sim.workloads import WORKLOADS, LengthDistribution, Workload, make_workload

DEFAULT_PROFILE = "llama-3.1-8b-h100"
DEFAULT_PODS = 8
DEFAULT_WORKLOADS = ("multi-turn", "shared-prompt")
DEFAULT_REQUESTS = 1000


@dataclass(frozen=True, slots=True)
class WorkloadLoad:
    """Open-loop rate of each built-in workload in the default run, per pod of the fleet.

    Chosen so an 8-pod Llama-3.1-8B H100 fleet is busy but not saturated under a
    cache-oblivious policy (that is where routing shows in TTFT).
    """

    rate_per_pod: float


DEFAULT_LOAD: dict[str, WorkloadLoad] = {
    "shared-prompt": WorkloadLoad(4.0),
    "multi-turn": WorkloadLoad(3.0),
    "agentic": WorkloadLoad(1.5),
    "random": WorkloadLoad(2.0),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `simulate` sub-command to an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "simulate",
        help="compare routing policies on a simulated vLLM fleet",
        description=(
            "Run each routing policy on the same arrivals against a simulated fleet of vLLM "
            "pods (virtual time) and print one table per workload. Without arguments: 8 pods "
            "of Llama-3.1-8B on H100, multi-turn chat and shared-prompt workloads."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--workload",
        action="append",
        metavar="NAME",
        help=f"synthetic workload ({', '.join(WORKLOADS)}); repeat or comma-separate",
    )
    src.add_argument("--trace", metavar="FILE", help="replay a Mooncake-format JSONL trace")
    p.add_argument(
        "--fleet",
        action="append",
        metavar="SPEC",
        help=(
            "fleet spec: 8 | 4p1d | 4p:tp1,1d:tp4 | 2:tp2:profile=NAME (see router/sim/fleet.py);"
            " repeat to compare fleets on the same arrivals"
        ),
    )
    p.add_argument("--pods", type=int, metavar="N", help="N pods of role both (same as --fleet N)")
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME",
        help=f"engine profile name or YAML path (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        metavar="LIST",
        help=f"comma-separated policies (default all: {','.join(POLICIES)})",
    )
    p.add_argument("--requests", type=int, metavar="N", help="requests per workload (first N)")
    p.add_argument("--speedup", type=float, default=1.0, metavar="X", help="trace time scaling")
    p.add_argument("--rate", type=float, metavar="R", help="open-loop requests/s (synthetic)")
    p.add_argument(
        "--concurrency",
        metavar="N[,N...]",
        help="closed loop with N outstanding requests; a list runs a sweep",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        metavar="N",
        help="random workload: every prompt exactly N tokens",
    )
    p.add_argument(
        "--output-tokens",
        type=int,
        metavar="N",
        help="synthetic workloads: every output exactly N tokens",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed (default 0)")
    p.add_argument(
        "--scrape-interval",
        type=float,
        default=SimSettings().scrape_interval_s,
        metavar="S",
        help="seconds between metric scrapes the router sees (default 0.1)",
    )
    p.add_argument(
        "--pd-threshold",
        type=int,
        default=SimSettings().pd_threshold,
        metavar="TOKENS",
        help="P/D: prefill remotely when more uncached prompt tokens than this (0 = always)",
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR (matplotlib)")
    p.set_defaults(func=run_simulate)
    return p


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def _concurrencies(text: str | None) -> list[int | None]:
    if not text:
        return [None]
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError("--concurrency values must be >= 1")
    return list(values)


def build_workloads(args: argparse.Namespace, pods: int) -> list[Workload]:
    """The workloads of this invocation, one per (source, concurrency level)."""
    out: list[Workload] = []
    for conc in _concurrencies(args.concurrency):
        if args.trace:
            out.append(
                trace_workload(
                    args.trace,
                    speedup=args.speedup,
                    limit=args.requests,
                    seed=args.seed,
                    concurrency=conc,
                )
            )
            continue
        names = _split(args.workload) or list(DEFAULT_WORKLOADS)
        for name in names:
            if name not in WORKLOADS:
                raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
            rate = args.rate or DEFAULT_LOAD[name].rate_per_pod * pods
            overrides: dict[str, Any] = {}
            if args.output_tokens is not None:
                overrides["output"] = LengthDistribution(args.output_tokens)
            if args.prompt_tokens is not None:
                if name != "random":
                    raise ValueError("--prompt-tokens applies to the random workload only")
                overrides["prompt"] = LengthDistribution(args.prompt_tokens)
            out.append(
                make_workload(
                    name,
                    num_requests=args.requests or DEFAULT_REQUESTS,
                    seed=args.seed,
                    rate_per_s=rate,
                    concurrency=conc,
                    **overrides,
                )
            )
    return out


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulation the arguments describe; print the table or JSON. Returns the exit
    code (2 for bad arguments or input)."""
    try:
        if args.fleet and args.pods:
            raise ValueError("give --fleet or --pods, not both")
        if args.pods is not None and args.pods < 1:
            raise ValueError("--pods must be >= 1")
        for flag in ("requests", "prompt_tokens", "output_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        if args.trace and (args.prompt_tokens or args.output_tokens or args.rate):
            raise ValueError(
                "--prompt-tokens, --output-tokens and --rate apply to synthetic workloads"
            )
        fleets = [parse_fleet(f) for f in args.fleet or [str(args.pods or DEFAULT_PODS)]]
        policies = _split([args.policies])
        unknown = [p for p in policies if p not in POLICIES]
        if unknown or not policies:
            raise ValueError(
                f"unknown policy {', '.join(unknown) or '(none)'}; known: {', '.join(POLICIES)}"
            )
        settings = SimSettings(
            scrape_interval_s=args.scrape_interval,
            pd_threshold=args.pd_threshold,
            seed=args.seed,
        )
        results: list[WorkloadResult] = []
        for fleet in fleets:
            # Synthetic rates scale with the fleet; the first fleet sets them for all, so
            # every fleet sees the same arrivals.
            for w in build_workloads(args, fleets[0].pods):
                results.append(run_policies(w, fleet, policies, args.profile, settings))
    except (ValueError, FleetSpecError, TraceError, OSError) as exc:
        print(f"kvroute simulate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(results))
    else:
        print(format_table(results))
    if args.plot:
        for path in write_plots(results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m router.sim.cli ...`: the simulate command on its own."""
    parser = argparse.ArgumentParser(prog="kvroute")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return run_simulate(args)


if __name__ == "__main__":
    sys.exit(main())
