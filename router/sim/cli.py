"""`kvroute simulate`: argument parsing and the run of every (fleet, workload, policy).

Owns the command line of the simulator face and its embedded default experiment (8 pods of
Llama-3.1-8B on H100; the multi-turn chat and shared-prompt workloads, 1,000 requests each).
`router/cli.py` wires `add_parser` and `run_simulate` into the `kvroute` command.

Sweeps: `--concurrency`, `--rate` and `--speedup` take comma-separated lists; each point is
one workload entry in the output (its `concurrency`, `rate_per_s` or `speedup` key says
which), every policy running the same arrivals at that point.

Examples::

    kvroute simulate                                   # the default experiment, as a table
    kvroute simulate --workload shared-prompt --pods 4 --policies round-robin,prefix-precise
    kvroute simulate --trace conversation_trace.jsonl --requests 5000 --pods 16 \
        --profile llama-3.3-70b-fp8-h100-tp4 --json
    kvroute simulate --workload random --prompt-tokens 1024 --output-tokens 1024 \
        --concurrency 8,16,32,64,128 --profile gpt-oss-120b-b200 \
        --fleet 1:tp4 --fleet 4p:tp1,1d:tp4 --policies round-robin --plot charts/
    kvroute simulate --workload shared-prompt --groups 64 --prefix-tokens 4000 \
        --question-tokens 300 --users-per-group 4 --rate 10,20,40 --max-outstanding 256
    kvroute simulate --workload llmd-kv-wins --policies random,llm-d-default,llm-d-precise \
        --policy-config mine=configs/policies/llm-d-default.yaml --requests-jsonl runs.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from router.sim.fleet import FleetSpecError, parse_fleet
from router.sim.policies import POLICIES
from router.sim.policy_files import load_policy_files
from router.sim.report import (
    WorkloadResult,
    format_table,
    plotting_unavailable,
    to_json,
    write_plots,
)
from router.sim.runner import PolicyRef, SimSettings, run_policies
from router.sim.traces import TraceError, trace_workload
from router.sim.workloads import WORKLOADS, LengthDistribution, Workload, make_workload

DEFAULT_PROFILE = "llama-3.1-8b-h100"
#: The fleet llm-d's benchmark ran on; the default profile of `--workload llmd-kv-wins`.
LLMD_PROFILE = "qwen3-32b-h100-tp2"
#: Default cap on outstanding requests of `--workload llmd-kv-wins`. llm-d's inference-perf
#: run had 224 workers, each sending many requests at once, so that is no cap; its published
#: EPP waiting queues (random / load-only: mean 27-29, p90 63-67, max 108-124 a pod) beside
#: ~37 running requests a pod mean some 500-1,000 requests outstanding over 8 pods, hence
#: 8 x 128. With 224 the backlog stays on the client and no policy's TTFT grows.
LLMD_MAX_OUTSTANDING = 1024
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
    "llmd-kv-wins": WorkloadLoad(2.5),
}

#: Workload shape flags → the params field each sets, per workload that has it.
_SHAPE_FIELDS: dict[str, dict[str, str]] = {
    "groups": {"shared-prompt": "groups", "llmd-kv-wins": "groups"},
    "prefix_tokens": {
        "shared-prompt": "system_tokens",
        "llmd-kv-wins": "system_tokens",
        "multi-turn": "system_tokens",
        "agentic": "preamble_tokens",
    },
    "question_tokens": {"shared-prompt": "question", "llmd-kv-wins": "question"},
    "users_per_group": {"shared-prompt": "users_per_group", "llmd-kv-wins": "users_per_group"},
    "turns": {"multi-turn": "turns", "agentic": "steps"},
    "stage_scale": {"llmd-kv-wins": "stage_scale"},
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
    add_workload_arguments(p)
    add_engine_arguments(p)
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
        metavar="NAME",
        help=(
            f"engine profile name or YAML path (default {DEFAULT_PROFILE}; "
            f"{LLMD_PROFILE} for --workload llmd-kv-wins)"
        ),
    )
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        metavar="LIST",
        help=f"comma-separated policies (default all: {','.join(POLICIES)})",
    )
    p.add_argument(
        "--policy-config",
        action="append",
        metavar="NAME=FILE",
        help=(
            "run a router config file (as `kvroute proxy --config` takes) as policy NAME, "
            "beside --policies; repeatable"
        ),
    )
    p.add_argument(
        "--max-outstanding",
        type=int,
        metavar="N",
        help=(
            "open loop with at most N requests outstanding; later ones wait on the client "
            f"(default none; {LLMD_MAX_OUTSTANDING} for llmd-kv-wins, as its benchmark)"
        ),
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        metavar="S",
        help=(
            "leave requests scheduled in the first S seconds out of the figures (default 0; "
            "llmd-kv-wins: its warm-up stage)"
        ),
    )
    p.add_argument(
        "--router-overhead-s",
        type=float,
        default=SimSettings().router_overhead_s,
        metavar="S",
        help=(
            "seconds from send to routing decision, in every TTFT (default 0.001: a router "
            "hop plus scoring a few-thousand-token prompt)"
        ),
    )
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
    p.add_argument(
        "--requests-jsonl",
        metavar="FILE",
        help=(
            "write one JSON line per request: policy, pod, predicted and actual hit, "
            "each pod's scores, times"
        ),
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR (matplotlib)")
    p.set_defaults(func=run_simulate)
    return p


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that describe the arrivals (workload or trace, size, load sweep, shape);
    shared by `kvroute simulate` and `kvroute plan` and read by `build_workloads`."""
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--workload",
        action="append",
        metavar="NAME",
        help=f"synthetic workload ({', '.join(WORKLOADS)}); repeat or comma-separate",
    )
    src.add_argument("--trace", metavar="FILE", help="replay a Mooncake-format JSONL trace")
    p.add_argument("--requests", type=int, metavar="N", help="requests per workload (first N)")
    p.add_argument(
        "--speedup",
        metavar="X[,X...]",
        help="trace time scaling (default 1); a list runs a sweep",
    )
    p.add_argument(
        "--rate",
        metavar="R[,R...]",
        help=(
            "open-loop requests/s of synthetic workloads (replaces llmd-kv-wins' ladder); "
            "a list runs a sweep"
        ),
    )
    p.add_argument(
        "--concurrency",
        metavar="N[,N...]",
        help="closed loop with N outstanding requests; a list runs a sweep",
    )
    shape = p.add_argument_group("synthetic workload shape")
    shape.add_argument(
        "--groups", type=int, metavar="N", help="shared-prompt, llmd-kv-wins: prefix groups"
    )
    shape.add_argument(
        "--prefix-tokens",
        type=int,
        metavar="N",
        help=(
            "shared-prompt, llmd-kv-wins: shared prefix of a group; multi-turn: system "
            "prompt; agentic: tool preamble"
        ),
    )
    shape.add_argument(
        "--question-tokens",
        type=int,
        metavar="N",
        help="shared-prompt, llmd-kv-wins: every question exactly N tokens",
    )
    shape.add_argument(
        "--users-per-group",
        type=int,
        metavar="N",
        help=(
            "shared-prompt, llmd-kv-wins: N users a group, each with one recurring question "
            "(0 = a fresh question every request)"
        ),
    )
    shape.add_argument(
        "--turns",
        metavar="N|MIN-MAX",
        help="multi-turn: turns a session; agentic: tool calls a loop",
    )
    shape.add_argument(
        "--stage-scale",
        type=float,
        metavar="X",
        help="llmd-kv-wins: multiply every ladder stage's duration (< 1 shortens the run)",
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


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that change every simulated pod's engine (over its profile); shared by
    `kvroute simulate` and `kvroute plan` and read into `SimSettings`."""
    p.add_argument(
        "--cpu-offload-gib",
        type=_cpu_offload_gib,
        metavar="GIB",
        help=(
            "CPU KV tier of every pod, GiB of host memory over its TP ranks (vLLM's "
            "--kv-offloading-size): blocks evicted from GPU move there and reload over PCIe "
            "on a hit; 0 = none (default: the profile's cpu_kv_cache_gib, 0 in the bundled ones)"
        ),
    )


def _cpu_offload_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of GiB (0 for no CPU tier)"
        ) from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB ≥ 0 (0 for no CPU tier)")
    return value


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def _positive_numbers(flag: str, text: str | None) -> list[float]:
    """`--rate` / `--speedup` list: every value a positive finite number, else an error
    naming the value."""
    if text is None:
        return []
    values: list[float] = []
    for raw in text.split(","):
        item = raw.strip()
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{flag}: {item!r} is not a positive number (in {text!r})")
        values.append(value)
    return values


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


def _turns(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        low = int(lo)
        high = int(hi) if sep else low
    except ValueError:
        raise ValueError(f"--turns: {text!r} is not N or MIN-MAX (e.g. 4 or 2-8)") from None
    if not 1 <= low <= high:
        raise ValueError(f"--turns: {text!r} needs 1 <= MIN <= MAX")
    return low, high


def _workload_names(args: argparse.Namespace) -> list[str]:
    if args.trace:
        return []
    names = _split(args.workload) or list(DEFAULT_WORKLOADS)
    for name in names:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return names


def _shape_overrides(args: argparse.Namespace, name: str, names: Sequence[str]) -> dict[str, Any]:
    """The params fields the shape flags set for workload `name`; a flag that applies to
    none of the chosen workloads is an error naming the ones it applies to."""
    out: dict[str, Any] = {}
    for flag, targets in _SHAPE_FIELDS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        option = "--" + flag.replace("_", "-")
        if not any(n in targets for n in names):
            raise ValueError(f"{option} applies to {', '.join(targets)} only")
        field = targets.get(name)
        if field is None:
            continue
        if field == "question":
            out[field] = LengthDistribution(value)
        elif field in ("turns", "steps"):
            low, high = _turns(value)
            out[f"min_{field}"], out[f"max_{field}"] = low, high
        else:
            out[field] = value
    return out


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One workload entry of the run: the arrivals and the sweep values that made them."""

    workload: Workload
    rate_per_s: float | None = None
    speedup: float | None = None


def build_workloads(args: argparse.Namespace, pods: int) -> list[SweepPoint]:
    """The workloads of this invocation, one per (source, concurrency, rate or speedup)."""
    out: list[SweepPoint] = []
    rates: list[float | None] = list(_positive_numbers("--rate", args.rate)) or [None]
    speedups: list[float | None] = list(_positive_numbers("--speedup", args.speedup)) or [None]
    names = _workload_names(args)
    for conc in _concurrencies(args.concurrency):
        if args.trace:
            for speedup in speedups:
                w = trace_workload(
                    args.trace,
                    speedup=speedup or 1.0,
                    limit=args.requests,
                    seed=args.seed,
                    concurrency=conc,
                )
                out.append(SweepPoint(w, speedup=speedup))
            continue
        for name in names:
            for rate in rates:
                overrides = _shape_overrides(args, name, names)
                if args.output_tokens is not None:
                    overrides["output"] = LengthDistribution(args.output_tokens)
                if args.prompt_tokens is not None:
                    if name != "random":
                        raise ValueError("--prompt-tokens applies to the random workload only")
                    overrides["prompt"] = LengthDistribution(args.prompt_tokens)
                if name == "llmd-kv-wins":
                    if rate is not None:  # a constant rate instead of the ladder
                        overrides.update(stages=(), warmup_s=0.0)
                        overrides["num_requests"] = args.requests or DEFAULT_REQUESTS
                    elif args.requests:
                        overrides["num_requests"] = args.requests
                else:
                    overrides["num_requests"] = args.requests or DEFAULT_REQUESTS
                overrides["rate_per_s"] = rate or DEFAULT_LOAD[name].rate_per_pod * pods
                w = make_workload(name, seed=args.seed, concurrency=conc, **overrides)
                out.append(SweepPoint(w, rate_per_s=rate))
    return out


class Progress:
    """A one-line progress bar on a stream (stderr): overall share of requests completed,
    the workload entry and policy running, wall time. Redrawn at most 5 times a second."""

    def __init__(self, total: int, stream: IO[str], width: int = 28) -> None:
        self.total = max(1, total)
        self.stream = stream
        self.width = width
        self.base = 0  # requests of the policies already finished
        self.label = ""
        self.started = time.monotonic()
        self._drawn_at = 0.0

    def start(self, label: str) -> None:
        self.label = label

    def update(self, policy: str, done: int, size: int) -> None:
        now = time.monotonic()
        finished = done >= size
        if not finished and now - self._drawn_at < 0.2:
            return
        self._drawn_at = now
        overall = min(self.total, self.base + done)
        filled = int(self.width * overall / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"\r[{bar}] {overall / self.total:4.0%} {self.label} {policy} {done}/{size} "
            f"{now - self.started:5.0f}s"
        )
        self.stream.write(line.ljust(100))
        self.stream.flush()
        if finished:
            self.base += size

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _point_label(point: SweepPoint, fleet: str) -> str:
    w = point.workload
    parts = [w.name]
    if w.concurrency:
        parts.append(f"c{w.concurrency}")
    if point.rate_per_s is not None:
        parts.append(f"{point.rate_per_s:g}req/s")
    if point.speedup is not None:
        parts.append(f"x{point.speedup:g}")
    return f"{' '.join(parts)} [{fleet}]"


def _policies(args: argparse.Namespace) -> list[PolicyRef]:
    files = load_policy_files(args.policy_config or (), reserved=POLICIES)
    names = _split([args.policies])
    unknown = [p for p in names if p not in POLICIES and p not in files]
    if unknown or not names:
        known = [*POLICIES, *files]
        raise ValueError(
            f"unknown policy {', '.join(unknown) or '(none)'}; known: {', '.join(known)}"
        )
    chosen: list[PolicyRef] = [files.get(n, n) for n in names]
    chosen += [pf for name, pf in files.items() if name not in names]
    return chosen


def check_numbers(args: argparse.Namespace) -> None:
    if args.pods is not None and args.pods < 1:
        raise ValueError("--pods must be >= 1")
    for flag in ("requests", "prompt_tokens", "output_tokens", "groups", "max_outstanding"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("prefix_tokens", "users_per_group"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.question_tokens is not None and args.question_tokens < 1:
        raise ValueError("--question-tokens must be >= 1")
    for flag in ("warmup_s", "router_overhead_s"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be a number >= 0")
    if args.stage_scale is not None and not (
        math.isfinite(args.stage_scale) and args.stage_scale > 0
    ):
        raise ValueError("--stage-scale must be a positive number")


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulation the arguments describe; print the table or JSON. Returns the exit
    code (2 for bad arguments or input)."""
    log_file: IO[str] | None = None
    progress: Progress | None = None
    try:
        if args.fleet and args.pods:
            raise ValueError("give --fleet or --pods, not both")
        check_numbers(args)
        if args.trace and (args.prompt_tokens or args.output_tokens or args.rate):
            raise ValueError(
                "--prompt-tokens, --output-tokens and --rate apply to synthetic workloads"
            )
        if args.speedup is not None and not args.trace:
            raise ValueError("--speedup applies to --trace replays")
        if args.plot:
            problem = plotting_unavailable()
            if problem:
                raise ValueError(problem)
        fleets = [parse_fleet(f) for f in args.fleet or [str(args.pods or DEFAULT_PODS)]]
        policies = _policies(args)
        names = _workload_names(args)
        llmd_only = bool(names) and set(names) == {"llmd-kv-wins"}
        profile = args.profile or (LLMD_PROFILE if llmd_only else DEFAULT_PROFILE)
        base = SimSettings(
            scrape_interval_s=args.scrape_interval,
            pd_threshold=args.pd_threshold,
            seed=args.seed,
            router_overhead_s=args.router_overhead_s,
            warmup_s=args.warmup_s,
            cpu_kv_cache_gib=args.cpu_offload_gib,
        )
        # Synthetic rates scale with the fleet; the first fleet sets them for all, so every
        # fleet sees the same arrivals.
        points = build_workloads(args, fleets[0].pods)
        if args.requests_jsonl:
            log_file = open(args.requests_jsonl, "w")  # noqa: SIM115 (closed in finally)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        if show:
            total = sum(len(p.workload.arrivals) for p in points) * len(policies) * len(fleets)
            progress = Progress(total, sys.stderr)
        results: list[WorkloadResult] = []
        for fleet in fleets:
            for point in points:
                w = point.workload
                cap = args.max_outstanding
                if cap is None and w.name == "llmd-kv-wins" and w.concurrency is None:
                    cap = LLMD_MAX_OUTSTANDING
                settings = dataclasses.replace(base, max_outstanding=cap)
                on_progress = None
                if progress is not None:
                    progress.start(_point_label(point, fleet.text))
                    on_progress = _progress_fn(progress, len(w.arrivals))
                log = _log_writer(log_file, fleet.text, point) if log_file else None
                r = run_policies(w, fleet, policies, profile, settings, on_progress, log)
                r.rate_per_s = point.rate_per_s
                r.speedup = point.speedup
                results.append(r)
    except (ValueError, FleetSpecError, TraceError, OSError) as exc:
        if progress is not None:
            progress.close()
        print(f"kvroute simulate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if log_file is not None:
            log_file.close()
    if progress is not None:
        progress.close()
    if args.json:
        print(to_json(results))
    else:
        print(format_table(results))
    if args.requests_jsonl:
        print(f"wrote {args.requests_jsonl}", file=sys.stderr)
    if args.plot:
        for path in write_plots(results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _progress_fn(bar: Progress, size: int) -> Callable[[str, int], None]:
    def update(policy: str, done: int) -> None:
        bar.update(policy, done, size)

    return update


def _log_writer(out: IO[str], fleet: str, point: SweepPoint) -> Callable[[dict[str, Any]], None]:
    """One JSON line per request, tagged with the fleet and the sweep point."""
    extra: dict[str, Any] = {"fleet": fleet}
    if point.workload.concurrency is not None:
        extra["concurrency"] = point.workload.concurrency
    if point.rate_per_s is not None:
        extra["rate_per_s"] = point.rate_per_s
    if point.speedup is not None:
        extra["speedup"] = point.speedup

    def write(entry: dict[str, Any]) -> None:
        out.write(json.dumps({**extra, **entry}, separators=(",", ":")) + "\n")

    return write


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m router.sim.cli ...`: the simulate command on its own."""
    parser = argparse.ArgumentParser(prog="kvroute")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return run_simulate(args)


if __name__ == "__main__":
    sys.exit(main())
