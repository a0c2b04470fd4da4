"""kvroute side by side with the peer routers, on one emulated fleet, in one command.

    python benchmarks/compare.py [--workload NAME ...|--trace FILE] [--pods N] [--requests N]
        [--concurrency C] [--speedup X] [--routers a,b,...] [--json OUT] [--plot DIR]
        [--router-cpus 0] [--fleet-cpus 1] [--no-pin] [--max-lag-ms 2] [--fleet vllm-cpu]

`--fleet vllm-cpu`: the routers in front of real vLLM CPU pods instead of the emulator
(method and caveats in benchmarks/vllm_fleet.py; timings are CPU timings).

Method. For each workload and each router, in this order: kvroute (default profile: prefix
cache from the pods' KV events, token mode with the bundled tokenizer, load scorers),
kvroute-approx (the same profile on character blocks with the approximate index learned from
its own picks: no tokenizer, no events), kvroute-round-robin, sglang-cache_aware,
sglang-round_robin (PyPI `sglang-router`), vllm-cache_aware, vllm-kv_aware (PyPI
`vllm-router`, fed by the pods' KV events) — a fresh emulated fleet is started (same pods,
seed and latency profile, `--speedup`), so every router starts from cold caches; the router
starts in its own process in front of it; the project's load generator (`router/loadgen.py`,
plain OpenAI chat completions, streaming) replays the same requests through it; the fleet's
prefix-cache hit rate is the delta of the pods' `vllm:prefix_cache_hits_total /
vllm:prefix_cache_queries_total`; the router's CPU seconds and peak RSS come from /proc (its
process tree). The pods publish KV events in the map wire form on the empty topic, which both
kvroute and vllm-router 0.1.17 read. Routers whose package is missing are skipped and named.
`--repeats N` runs each (workload, router) N times, round-robin over the routers, and reports
the median of each figure (failures summed).

Fairness. Two cores, two sides: the router's process tree is pinned to `--router-cpus`
(default core 0; every thread, see peers.py), this process (the load generator) and the
emulated pods it starts to `--fleet-cpus` (default core 1), so a router's own CPU cost cannot
slow the pods' clocks or the client's, and no router gets the other side's spare cycles. Each
run measures whether the measuring side kept time: the pods' step lag (how late each engine
step's tokens reached the HTTP writers past the step's end deadline, wall ms, from the
`kvroute_emulator_step_lag_seconds` histogram of each pod's /metrics: the run's delta, p99 per
pod, the worst pod), and the load generator's lag (the larger of its send lag p99 — how late
each request left against its schedule — and its event-loop lag p99, see router/loadgen.py).
A run whose lag p99 (the larger of the two) exceeds `--max-lag-ms` (2 ms) is flagged INVALID
in the table (`"valid": false` in the JSON) and not ranked: its TTFTs carry the harness's own
delay. `--speedup` 1 (the emulated GPU at real time) is the default: the fleet side's CPU work
per wall second grows with the speedup (tokens and requests per second), so 1 leaves that core
the most idle time at a run length of minutes; the earlier default (2, and 4 in the published
figures) shared the core with twice or four times the work. The check, not the default,
decides: a busy machine makes every run INVALID at any speedup (measured 2026-12-01 with
other jobs running: step lag p99 200-970 ms at 0.5, 1 and 2). Pods tokenize long prompts in
a tokenizer process of their own at idle CPU priority (router/emulator/tokenize_process.py,
as vLLM's API server tokenizes apart from its engine core), through an exact piece cache
(router/bytelevel.py, ~10x faster than `tokenizers` on the load generator's text): before,
each pod tokenized on its event loop and a 25k-token Mooncake prompt held it 70-600 ms, which
was the step lag of every run (a profile of one pod under a Mooncake slice: ~87% of its loop's
busy time in `encode_prompt`; after: one pod's step lag p99 8 ms instead of 230-530 ms at the
same load on the same, busy, machine). Before each run every pod gets one warm-up request
(`warm_pods`) so no measured request waits for that process to start. Each row also carries
`fleet_cpu_busy` (the share of the fleet cores' time anything kept busy during the run, from
/proc/stat: near 1.0 the tokenizer processes are starved and TTFTs include the wait) and
`fleet_cpu_share` (CPU seconds of the pods, their tokenizer processes and the load generator
per wall second: the share of a core the measuring side itself needs, a figure other jobs do
not change much) and `loadavg_1m` (the machine's load when the run ended: other jobs). The
trace's arrival times follow the speedup (`--time-scale` defaults to 1 / `--speedup`, so the
load relative to the fleet's capacity does not change with it).

The setting meant to be valid: the defaults (`--pods 4 --speedup 1 --requests 300`, one core a
side): the measuring side itself used 0.18-0.28 of its core (`fleet_cpu_share`, multi-turn and
Mooncake, 2026-12-02), which leaves it mostly idle on a quiet machine. Shown valid on a
quiet machine 2026-12-03 (kvroute and sglang-router cache_aware, 3 runs each): multi-turn 6 of
6 runs, Mooncake 4 of 6 (harness lag p99 1.1-1.8 ms), after the load generator's send path
(router/loadgen_http.py) and the pods' cached `/metrics` text. Earlier, on 2026-12-02,
the machine ran other jobs (load average 9-20, the fleet core 100% busy), and every
run was INVALID (step lag p99 46-841 ms). The load generator renders every prompt's text before the
run starts (`LoadGenerator._prerender`, up to 256 MB of text): rendered at send time on its
event loop (`tokens_to_text`, ~5.6 ms CPU a Mooncake prompt on average, tens of ms for the
longest) it made the send lag p99 11-21 ms on Mooncake.

Workloads (all chat, output capped at `--max-tokens` so the 2-core machine spends its CPU on
routing, not on streaming tokens). Sizes are in workload tokens; the load generator's text is
~2.8 bundled-tokenizer tokens per workload token, so the pods see ~2.8x longer prompts:
- `shared-prompt`: `--groups` system prompts of 2,048 tokens shared by many questions, closed
  loop at `--concurrency`;
- `multi-turn`: 3-8 turn chat sessions whose every turn resends the whole history (first
  message median 1,500 tokens), closed loop at `--concurrency`;
- `mooncake`: the first `--trace-requests` requests of the Mooncake conversation trace (those
  with prompts over `--trace-max-input` tokens left out), open loop at the trace's own arrival
  times scaled by `--time-scale` (0.5 = twice as fast).

Raw overhead: four zero-latency pods (benchmarks/zero_latency_pod.py, one process), 5,000
small non-streaming completions at concurrency 64 straight to a pod ("direct") and through each
router: requests/s, and the router's added latency (its p50/p99 minus direct's).

Output: a table per workload (valid rows ranked by TTFT p95; a row of `--repeats` runs is the
median of its valid runs when most were valid, see `median_row`), the overhead table, `--json OUT`
(the object `{"runs": [...], "overhead": [...]}` plus `settings`, `machine`, `versions`,
`skipped`; each run also has `valid`, `rank`, `lag_p99_ms` and its parts, `router_cpus`, and
`pod_requests`, the requests each pod served), `--plot DIR` (ttft_p95.png, hit_rate.png,
ttft_cdf_<workload>.png).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from http_load import Child, closed_loop, python
from peers import (
    ROUTERS,
    FleetView,
    RouterError,
    RouterProcess,
    format_cpus,
    kvroute_config,
    parse_cpus,
    pin_tree,
    renice_tree,
    tree_cpu_seconds,
    vllm_router_binary,
)
from prometheus_client.parser import text_string_to_metric_families

from router.emulator.fleet import EmulatedFleet
from router.loadgen import LoadReport, LoadSettings, run_load, tokens_to_text
from router.sim.traces import trace_workload
from router.sim.workloads import LengthDistribution, Workload, make_workload

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORKLOADS = ("shared-prompt", "multi-turn", "mooncake")
#: Where the Mooncake trace lives: beside the repo (CI), then the shared workplace folder.
TRACE_CANDIDATES = (
    REPO.parent / "shared/data/mooncake/conversation_trace.jsonl",
    Path("/work/shared/data/mooncake/conversation_trace.jsonl"),
)
RUN_FIELDS = (
    "router", "workload", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "tpot_p50_s",
    "output_tokens_per_s", "hit_rate", "failed", "router_cpu_s", "router_peak_rss_mb",
    "step_lag_p99_ms", "send_lag_p99_ms", "loop_lag_p99_ms", "lag_p99_ms", "valid", "rank",
    "router_cpus", "pod_requests", "fleet_cpu_busy", "fleet_cpu_share", "loadavg_1m",
    "runs", "valid_runs",
)  # fmt: skip
#: Figures a repeated run reports as the median (the rest: see `median_row`).
MEDIAN_FIELDS = RUN_FIELDS[2:11]
LAG_FIELDS = ("step_lag_p99_ms", "send_lag_p99_ms", "loop_lag_p99_ms", "lag_p99_ms")
STEP_LAG_METRIC = "kvroute_emulator_step_lag_seconds"
#: Pseudo-words of the warm-up prompt: most of the load generator's 4,900 words appear.
WARM_WORDS = 20_000
REQUESTS_METRIC = "vllm:request_success"
OVERHEAD_BODY = json.dumps(
    {"model": "m", "prompt": "The quick brown fox " * 8, "max_tokens": 1}
).encode()


#: Routers the raw-overhead run covers.
OVERHEAD_ROUTERS = (
    "kvroute", "kvroute-round-robin", "sglang-cache_aware", "sglang-round_robin",
    "vllm-cache_aware", "vllm-kv_aware",
)  # fmt: skip
#: Routers run by default (the policy routers are for validate_peers.py; name them to add them).
DEFAULT_ROUTERS = ("kvroute", "kvroute-approx", *OVERHEAD_ROUTERS[1:])


def default_trace() -> Path | None:
    return next((p for p in TRACE_CANDIDATES if p.exists()), None)


# --------------------------------------------------------------------------- workloads
def build_workload(name: str, args: argparse.Namespace) -> tuple[Workload, float | None]:
    """The workload and, for a trace, the open-loop rate (requests/s) its scaled times give."""
    n, seed = args.requests, args.seed
    if name == "shared-prompt":
        w = make_workload(
            "shared-prompt", num_requests=n, seed=seed, groups=args.groups, system_tokens=2048
        )
        return w, None
    if name == "multi-turn":
        w = make_workload(
            "multi-turn",
            num_requests=n,
            seed=seed,
            first_user=LengthDistribution(1500, 0.4, 400, 3000),
            user=LengthDistribution(128, 0.6, 16, 1024),
            min_turns=3,
            max_turns=8,
        )
        return w, None
    if name == "mooncake" or name.endswith(".jsonl"):
        path = Path(name) if name.endswith(".jsonl") else default_trace()
        if path is None:
            raise SystemExit("compare: no Mooncake trace found; give --trace FILE")
        w = trace_workload(str(path), limit=args.trace_requests or n, seed=seed)
        # The load generator's text is ~2.8 bundled-tokenizer tokens per trace token: leave out
        # the prompts that would not fit a pod's context even so.
        kept = [a for a in w.arrivals if len(a.token_ids) <= args.trace_max_input]
        w = dataclasses.replace(
            w, arrivals=[dataclasses.replace(a, index=i) for i, a in enumerate(kept)]
        )
        span = w.arrivals[-1].time_s - w.arrivals[0].time_s if w.arrivals else 0.0
        rate = len(w.arrivals) / (span * args.time_scale) if span > 0 else None
        return w, rate
    return make_workload(name, num_requests=n, seed=seed), None


def workload_label(name: str) -> str:
    return "mooncake" if name.endswith(".jsonl") else name


# --------------------------------------------------------------------------- pods' counters
@dataclass(slots=True)
class PodSample:
    """One pod's counters at one moment (subtract two with `delta`)."""

    requests: float = 0.0
    hits: float = 0.0
    queries: float = 0.0
    #: Step-lag histogram: (upper bound in seconds, cumulative count), +Inf last.
    lag_buckets: tuple[tuple[float, float], ...] = ()

    def delta(self, before: PodSample) -> PodSample:
        old = dict(before.lag_buckets)
        return PodSample(
            self.requests - before.requests,
            self.hits - before.hits,
            self.queries - before.queries,
            tuple((le, n - old.get(le, 0.0)) for le, n in self.lag_buckets),
        )


def parse_pod_metrics(text: str) -> PodSample:
    """The counters compare reads from a pod's /metrics page."""
    out = PodSample()
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        if family.name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries", REQUESTS_METRIC):
            total = sum(s.value for s in family.samples if s.name.endswith("_total"))
            if family.name == REQUESTS_METRIC:
                out.requests += total
            elif family.name.endswith("hits"):
                out.hits += total
            else:
                out.queries += total
        elif family.name == STEP_LAG_METRIC:
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    buckets.append((float(s.labels["le"]), s.value))
    out.lag_buckets = tuple(sorted(buckets))
    return out


async def warm_pods(client: httpx.AsyncClient, fleet: EmulatedFleet) -> None:
    """One long chat request to each pod before the run: it starts the pod's tokenizer process
    (router/emulator/tokenize_process.py, ~1 s to spawn and load) and fills its piece cache
    with the load generator's vocabulary, so no measured request waits for either. Its own
    prompt is drawn apart from every workload's (another seed), and the counters are read after
    it."""
    words = tokens_to_text(np.random.default_rng(2**31 - 1).integers(0, 1 << 20, WARM_WORDS))

    async def one(pod: Any) -> None:
        body = {
            "model": pod.model,
            "messages": [{"role": "user", "content": f"warm-up {pod.endpoint} {words}"}],
            "max_tokens": 1,
        }
        r = await client.post(f"{pod.url}/v1/chat/completions", json=body, timeout=60.0)
        r.raise_for_status()

    await asyncio.gather(*(one(p) for p in fleet.pods))


def cpu_busy_ticks(cpus: frozenset[int] | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks of `cpus` since boot, from /proc/stat (None: unpinned or no
    /proc): over a run, the share of the fleet side's cores that anything (the pods, the load
    generator, other jobs on the machine) kept busy."""
    if cpus is None:
        return None
    busy = total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        total += sum(ticks[:8])
        busy += sum(ticks[:8]) - idle
    return (busy, total) if total else None


def fleet_cpu_seconds(fleet: EmulatedFleet) -> float:
    """CPU seconds of the measuring side itself: the pods (with their tokenizer processes)
    and this process (the load generator). Per wall second of a run it is the share of a core
    that side needs, whatever else runs on the machine: well under 1 on the fleet's one core
    is what a valid run needs room for."""
    return time.process_time() + sum(tree_cpu_seconds(p.pid) for p in fleet.pods)


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 3)


async def scrape_pods(client: httpx.AsyncClient, fleet: EmulatedFleet) -> list[PodSample]:
    return [parse_pod_metrics((await client.get(f"{p.url}/metrics")).text) for p in fleet.pods]


def histogram_quantile(buckets: tuple[tuple[float, float], ...], q: float) -> float | None:
    """The q-quantile of a cumulative histogram ((upper bound, count) sorted, +Inf last), by
    linear interpolation inside the bucket it falls in, as Prometheus' `histogram_quantile`
    does; in the +Inf bucket, the largest finite bound. None when it holds no observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lo_bound
            if count == lo_count:
                return bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / (count - lo_count)
        lo_bound, lo_count = bound, count
    return lo_bound


def step_lag_p99_ms(deltas: list[PodSample]) -> float | None:
    """The worst pod's step-lag p99 over a run (ms); None if no pod ran a step."""
    values = [histogram_quantile(d.lag_buckets, 0.99) for d in deltas]
    known = [v for v in values if v is not None]
    return round(max(known) * 1000, 3) if known else None


def lag_verdict(
    step_ms: float | None, send_ms: float | None, loop_ms: float | None, max_lag_ms: float
) -> tuple[float | None, bool]:
    """(the run's lag p99 in ms, valid): the worst of the pods' step lag and the load
    generator's send and loop lags; valid when it is at most `max_lag_ms`. A run with no pod
    step lag or no loop lag measured is not valid (nothing shows the timing held)."""
    parts = [v for v in (step_ms, send_ms, loop_ms) if v is not None]
    if step_ms is None or loop_ms is None:
        return (max(parts) if parts else None), False
    worst = max(parts)
    return worst, worst <= max_lag_ms


def rank_rows(rows: list[dict[str, Any]]) -> None:
    """Per workload, rank the valid rows by TTFT p95 (1 = lowest); invalid rows get None."""
    for wl in dict.fromkeys(r["workload"] for r in rows):
        ranked = sorted(
            (r for r in rows if r["workload"] == wl and r["valid"] and r["ttft_p95_s"] is not None),
            key=lambda r: r["ttft_p95_s"],
        )
        for r in rows:
            if r["workload"] == wl:
                r["rank"] = None
        for i, r in enumerate(ranked, 1):
            r["rank"] = i


# --------------------------------------------------------------------------- pinning
def pin_sides(args: argparse.Namespace) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """Bind this process (every thread: the load generator) to the fleet's cores, so the pods
    it starts inherit them; return (router cores, fleet cores), (None, None) with `--no-pin`."""
    if args.no_pin:
        return None, None
    router, fleet = parse_cpus(args.router_cpus), parse_cpus(args.fleet_cpus)
    pin_tree(os.getpid(), fleet)
    return router, fleet


# --------------------------------------------------------------------------- one run
@dataclass(slots=True)
class RunResult:
    row: dict[str, Any]
    ttfts: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def pod_args(args: argparse.Namespace) -> list[str]:
    # Map wire form on the empty topic: what vllm-router 0.1.17 reads; kvroute reads both.
    return [
        "--seed", str(args.seed), "--events-wire-form", "map", "--events-topic", "",
        "--max-model-len", str(args.max_model_len), "--tokenize-process",
    ]  # fmt: skip


def fleet_view(fleet: EmulatedFleet, scrape_interval_s: float | None = None) -> FleetView:
    """The fleet as the routers see it; `scrape_interval_s` sets kvroute's metrics scrape
    period (None: its default, 0.2 s)."""
    doc = fleet.config()
    approx_doc = {
        "pods": [{"endpoint": p.endpoint, "models": [p.model]} for p in fleet.pods],
        "blocks": {"mode": "chars", "chars_per_block": 64},
        "prefix_index": {"mode": "approximate"},
    }
    if scrape_interval_s is not None:
        for d in (doc, approx_doc):
            d["scrape"] = {"interval_s": scrape_interval_s}
    return FleetView(
        urls=tuple(p.url for p in fleet.pods),
        kv_events={p.url: p.kv_events_endpoint for p in fleet.pods if p.kv_events_endpoint},
        kvroute_config=kvroute_config(doc),
        kvroute_approx_config=kvroute_config(approx_doc),
        block_size=fleet.pods[0].block_size,
        fleet_doc=doc,
    )


async def run_one(
    router: str, workload: Workload, rate: float | None, label: str, args: argparse.Namespace
) -> RunResult:
    if args.fleet == "vllm-cpu":  # real vLLM pods instead of the emulator: vllm_fleet.py
        from vllm_fleet import mark_cpu_run, run_load_on_vllm

        report, pages, proc = await run_load_on_vllm(router, workload, rate, args)
        deltas = [parse_pod_metrics(a).delta(parse_pod_metrics(b)) for b, a in pages]
        res = summarize(router, label, report, deltas, proc, args.max_lag_ms)
        mark_cpu_run(res.row, args.max_lag_ms)
        return res
    spec = ROUTERS[router]
    async with (
        EmulatedFleet(
            pods=args.pods,
            events="bind",
            pod_args=pod_args(args),
            speedup=args.speedup,
            profile=args.profile,
            stderr=subprocess.DEVNULL,
        ) as fleet,
        httpx.AsyncClient(timeout=10.0) as client,
    ):
        if args.pod_nice:
            for pod in fleet.pods:
                renice_tree(pod.pid, args.pod_nice)
        await warm_pods(client, fleet)
        before = await scrape_pods(client, fleet)
        ticks = cpu_busy_ticks(args.fleet_cpu_set)
        own0 = fleet_cpu_seconds(fleet)
        view = fleet_view(fleet, args.kvroute_scrape_interval)
        proc = RouterProcess(spec, view, cpus=args.router_cpu_set)
        async with proc:
            settings = LoadSettings(
                base_url=proc.url,
                model=fleet.pods[0].model,
                api="chat",
                concurrency=None if rate else args.concurrency,
                rate=rate,
                timeout_s=args.timeout,
                warm_connections=None,
                max_tokens_cap=args.max_tokens,
            )
            report = await run_load(workload, settings)
            # Let the last responses' metrics land before reading the counters.
            await asyncio.sleep(0.3)
        busy = busy_share(ticks, cpu_busy_ticks(args.fleet_cpu_set))
        own = (fleet_cpu_seconds(fleet) - own0) / report.wall_s if report.wall_s > 0 else None
        after = await scrape_pods(client, fleet)
    deltas = [a.delta(b) for a, b in zip(after, before, strict=True)]
    res = summarize(router, label, report, deltas, proc, args.max_lag_ms)
    res.row["fleet_cpu_busy"] = busy
    res.row["fleet_cpu_share"] = None if own is None else round(own, 3)
    return res


def summarize(
    router: str,
    workload: str,
    report: LoadReport,
    pods: list[PodSample],
    proc: RouterProcess,
    max_lag_ms: float = 2.0,
) -> RunResult:
    s = report.summary()
    hits, queries = sum(p.hits for p in pods), sum(p.queries for p in pods)
    step_ms = step_lag_p99_ms(pods)
    lag, valid = lag_verdict(step_ms, s["send_lag_p99_ms"], s["loop_lag_p99_ms"], max_lag_ms)
    row = {
        "router": router,
        "workload": workload,
        "ttft_p50_s": s["ttft_p50_s"],
        "ttft_p95_s": s["ttft_p95_s"],
        "ttft_p99_s": s["ttft_p99_s"],
        "tpot_p50_s": s["tpot_p50_s"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "hit_rate": round(hits / queries, 4) if queries > 0 else 0.0,
        "failed": s["failed"],
        "router_cpu_s": round(proc.usage.cpu_s, 2),
        "router_peak_rss_mb": round(proc.usage.peak_rss_mb, 1),
        "step_lag_p99_ms": step_ms,
        "send_lag_p99_ms": s["send_lag_p99_ms"],
        "loop_lag_p99_ms": s["loop_lag_p99_ms"],
        "lag_p99_ms": lag,
        "valid": valid,
        "rank": None,
        "router_cpus": format_cpus(proc.usage.cpus) if proc.usage.cpus else None,
        "pod_requests": [int(p.requests) for p in pods],
        "fleet_cpu_busy": None,
        "fleet_cpu_share": None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "runs": 1,
        "valid_runs": int(valid),
    }
    ttfts = [r.ttft_s for r in report.results if r.ok and r.ttft_s is not None]
    return RunResult(row, ttfts, s["errors"])


def median_row(results: list[RunResult]) -> dict[str, Any]:
    """One row for repeated runs. When most runs were valid, the figures are the medians of
    the valid runs and their worst lag, and the row is valid: a run flagged INVALID is left
    out, not averaged in (its TTFTs carry the harness's delay). Otherwise the row is invalid,
    with the medians and the worst lag of every run. Failures and each pod's requests are
    summed over every run; `runs` and `valid_runs` say how many there were."""
    all_rows = [r.row for r in results]
    valid_rows = [r for r in all_rows if r["valid"]]
    valid = 2 * len(valid_rows) > len(all_rows)
    rows = valid_rows if valid else all_rows
    out = dict(rows[0])
    for key in MEDIAN_FIELDS:
        if key == "failed":
            out[key] = sum(r[key] for r in all_rows if r[key] is not None)
            continue
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            out[key] = round(statistics.median(values), 6)
    for key in (*LAG_FIELDS, "fleet_cpu_busy", "fleet_cpu_share", "loadavg_1m"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = max(values) if values else None
    out["valid"] = valid
    out["runs"] = len(all_rows)
    out["valid_runs"] = len(valid_rows)
    out["pod_requests"] = [
        sum(col) for col in zip(*(r["pod_requests"] for r in all_rows), strict=True)
    ]
    return out


# --------------------------------------------------------------------------- overhead
async def overhead_one(
    router: str, urls: tuple[str, ...], direct: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    doc = {
        "pods": [{"endpoint": u.removeprefix("http://"), "models": ["m"]} for u in urls],
        "blocks": {"mode": "chars"},
    }
    config = kvroute_config(doc)
    view = FleetView(urls=urls, kv_events={}, kvroute_config=config, kvroute_approx_config=config)
    async with RouterProcess(ROUTERS[router], view, cpus=args.router_cpu_set) as proc:
        res = await closed_loop(
            f"{proc.url}/v1/completions",
            OVERHEAD_BODY,
            args.overhead_concurrency,
            count=args.overhead_requests,
        )
    p50, p99 = res.percentile_ms(50), res.percentile_ms(99)
    return {
        "router": router,
        "rps": round(res.rps, 1),
        "added_p50_ms": round(p50 - direct["p50"], 3),
        "added_p99_ms": round(p99 - direct["p99"], 3),
        "failed": res.failed,
        "router_cpu_s": round(proc.usage.cpu_s, 2),
    }


async def run_overhead(routers: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    pods = Child(python(str(HERE / "zero_latency_pod.py"), "--ports", "0", "0", "0", "0"))
    try:
        urls = tuple(f"http://127.0.0.1:{p}" for p in pods.ready)
        d = await closed_loop(
            f"{urls[0]}/v1/completions",
            OVERHEAD_BODY,
            args.overhead_concurrency,
            count=args.overhead_requests,
        )
        direct = {"p50": d.percentile_ms(50), "p99": d.percentile_ms(99), "rps": d.rps}
        say(f"overhead: direct {d.rps:,.0f} req/s, p50 {direct['p50']:.2f} ms")
        out = []
        # kvroute-approx would repeat kvroute: zero-latency pods make both run in chars mode;
        # the policy routers need an emulated fleet's document.
        for r in (r for r in routers if r in OVERHEAD_ROUTERS):
            try:
                row = await overhead_one(r, urls, direct, args)
            except RouterError as e:
                say(f"overhead: {r} did not start: {e}")
                continue
            say(f"overhead: {r}: {row}")
            out.append(row)
        return out
    finally:
        pods.stop()


# --------------------------------------------------------------------------- output
def say(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def format_runs(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'router':<27}{'TTFT p50':>9}{'p95':>8}{'p99':>8}{'TPOT p50':>10}{'out tok/s':>10}"
        f"{'hit rate':>9}{'failed':>7}{'CPU s':>7}{'RSS MB':>8}{'lag p99':>11}{'rank':>13}"
    )
    lines: list[str] = []
    for wl in dict.fromkeys(r["workload"] for r in rows):
        lines += [f"\n{wl}", head]
        for r in (r for r in rows if r["workload"] == wl):

            def f(v: float | None, fmt: str) -> str:
                return "-" if v is None else format(v, fmt)

            rank = "INVALID" if not r.get("valid", True) else f(r.get("rank"), "d")
            if (r.get("runs") or 1) > 1:  # how many of the repeats the figures are from
                rank += f" {r.get('valid_runs')}/{r['runs']}"
            lines.append(
                f"{r['router']:<27}{f(r['ttft_p50_s'], '.3f'):>9}{f(r['ttft_p95_s'], '.3f'):>8}"
                f"{f(r['ttft_p99_s'], '.3f'):>8}"
                f"{f(r['tpot_p50_s'] and r['tpot_p50_s'] * 1000, '.1f') + 'ms':>10}"
                f"{r['output_tokens_per_s']:>10,.0f}{r['hit_rate']:>9.1%}{r['failed']:>7d}"
                f"{r['router_cpu_s']:>7.1f}{r['router_peak_rss_mb']:>8.0f}"
                f"{f(r.get('lag_p99_ms'), '.2f') + 'ms':>11}{rank:>13}"
            )
    return "\n".join(lines)


def format_overhead(rows: list[dict[str, Any]]) -> str:
    lines = [f"\n{'router':<27}{'req/s':>9}{'added p50 ms':>14}{'added p99 ms':>14}"]
    for r in rows:
        lines.append(
            f"{r['router']:<27}{r['rps']:>9,.0f}{r['added_p50_ms']:>14.2f}{r['added_p99_ms']:>14.2f}"
        )
    return "\n".join(lines)


def plot(
    out_dir: Path, rows: list[dict[str, Any]], cdfs: dict[tuple[str, str], list[float]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    routers = list(dict.fromkeys(r["router"] for r in rows))
    width = 0.8 / max(1, len(routers))
    for key, label, fname in (
        ("ttft_p95_s", "TTFT p95 (s)", "ttft_p95.png"),
        ("hit_rate", "prefix-cache hit rate", "hit_rate.png"),
    ):
        fig, ax = plt.subplots(figsize=(9, 4))
        for i, router in enumerate(routers):
            vals = []
            for wl in workloads:
                row = next((r for r in rows if r["router"] == router and r["workload"] == wl), None)
                vals.append((row or {}).get(key) or 0.0)
            xs = np.arange(len(workloads)) + i * width
            ax.bar(xs, vals, width, label=router)
        ax.set_xticks(np.arange(len(workloads)) + width * (len(routers) - 1) / 2, workloads)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
    for wl in workloads:
        fig, ax = plt.subplots(figsize=(7, 4))
        for router in routers:
            xs = np.sort(np.array(cdfs.get((router, wl), [])))
            if len(xs):
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=router)
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF: {wl}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"ttft_cdf_{wl}.png", dpi=120)
        plt.close(fig)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("sglang-router", "vllm-router", "kvroute"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
    }


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--workload",
        action="append",
        help="shared-prompt, multi-turn, mooncake or another sim workload (repeatable; "
        "default: shared-prompt, multi-turn, mooncake)",
    )
    src.add_argument("--trace", help="a Mooncake JSONL trace (the only workload)")
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--requests", type=int, default=300, help="requests per workload")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="emulated s per wall s (1: the least fleet-side work per wall second; each run's "
        "lag check decides whether it was valid)",
    )
    p.add_argument("--profile", default=None, help="emulator latency profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32, help="cap on output tokens per request")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=262_144,
        help="pods' context limit (the load generator's text is ~2.7 bundled-tokenizer tokens "
        "per workload token, so the longest Mooncake prompts exceed 131,072)",
    )
    p.add_argument("--groups", type=int, default=16, help="shared-prompt: system prompts")
    p.add_argument(
        "--trace-requests", type=int, default=None, help="trace: first N (default --requests)"
    )
    p.add_argument(
        "--trace-max-input",
        type=int,
        default=40_000,
        help="trace: leave out requests with longer prompts (trace tokens)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="trace: arrival time factor (default 1 / --speedup: the same load at any speedup)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per router and workload (median reported)"
    )
    p.add_argument(
        "--routers",
        default=",".join(DEFAULT_ROUTERS),
        help=f"comma-separated, in order (known: {', '.join(ROUTERS)})",
    )
    p.add_argument("--router-cpus", default="0", help="cores of the router's process tree")
    p.add_argument(
        "--fleet-cpus", default="1", help="cores of the emulated pods and the load generator"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin (runs share every core)")
    p.add_argument(
        "--kvroute-scrape-interval",
        type=float,
        default=None,
        help="kvroute's metrics scrape period in s (default its own, 0.2 s; each scrape costs "
        "every pod a /metrics render on the fleet's core)",
    )
    p.add_argument(
        "--pod-nice",
        type=int,
        default=5,
        help="nice value of the emulated pods (0: the load generator's own); see Fairness",
    )
    p.add_argument(
        "--max-lag-ms",
        type=float,
        default=2.0,
        help="a run whose step or send lag p99 exceeds this is INVALID (not ranked)",
    )
    p.add_argument(
        "--fleet",
        choices=("emulator", "vllm-cpu"),
        default="emulator",
        help="vllm-cpu: real vLLM CPU pods (benchmarks/vllm_fleet.py; no overhead run)",
    )
    p.add_argument("--overhead-requests", type=int, default=5000)
    p.add_argument("--overhead-concurrency", type=int, default=64)
    p.add_argument("--no-overhead", action="store_true", help="skip the raw-overhead run")
    p.add_argument("--no-workloads", action="store_true", help="only the raw-overhead run")
    p.add_argument("--json", dest="json_out", help="write the result object here")
    p.add_argument("--plot", help="write PNG charts into this directory")
    args = p.parse_args(argv)
    unknown = [r for r in args.routers.split(",") if r not in ROUTERS]
    if unknown:
        p.error(f"unknown router(s) {', '.join(unknown)}; known: {', '.join(ROUTERS)}")
    if min(args.pods, args.requests, args.concurrency, args.repeats) < 1:
        p.error("--pods, --requests, --concurrency, --repeats must be >= 1")
    if args.speedup <= 0 or (args.time_scale is not None and args.time_scale <= 0):
        p.error("--speedup and --time-scale must be > 0")
    if args.time_scale is None:
        args.time_scale = 1.0 / args.speedup
    if args.fleet == "vllm-cpu":
        args.no_overhead = True  # zero-latency pods measure the routers, not a fleet
    args.router_cpu_set = None
    args.fleet_cpu_set = None
    if not args.no_pin:
        try:
            router, fleet = parse_cpus(args.router_cpus), parse_cpus(args.fleet_cpus)
        except ValueError as e:
            p.error(f"--router-cpus/--fleet-cpus: {e}")
        allowed = os.sched_getaffinity(0)
        if not (router | fleet) <= allowed:
            p.error(
                f"--router-cpus {args.router_cpus} / --fleet-cpus {args.fleet_cpus}: this "
                f"process may use cores {format_cpus(allowed)} only (or give --no-pin)"
            )
        if router & fleet:
            p.error("--router-cpus and --fleet-cpus overlap: give each side its own cores")
        args.router_cpu_set = router
        args.fleet_cpu_set = fleet
    return args


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    _, fleet_cpus = pin_sides(args)
    if fleet_cpus is not None:
        say(f"pinned: routers on cores {args.router_cpus}, pods and load generator on "
            f"{format_cpus(fleet_cpus)}")  # fmt: skip
    wanted = args.routers.split(",")
    skipped: dict[str, str] = {}
    routers = []
    for r in wanted:
        why = ROUTERS[r].missing()
        if why:
            skipped[r] = why
            say(f"skipping {r}: {why}")
        else:
            routers.append(r)
    names = [args.trace] if args.trace else list(args.workload or DEFAULT_WORKLOADS)
    if not args.trace and "mooncake" in names and default_trace() is None:
        say("skipping mooncake: no trace found (give --trace FILE)")
        names.remove("mooncake")
    runs: list[dict[str, Any]] = []
    cdfs: dict[tuple[str, str], list[float]] = {}
    errors: dict[str, dict[str, int]] = {}
    all_rows: list[dict[str, Any]] = []
    if not args.no_workloads:
        for name in names:
            workload, rate = build_workload(name, args)
            label = workload_label(name)
            pace = f"open loop {rate:.2f} req/s" if rate else f"concurrency {args.concurrency}"
            each: dict[str, list[RunResult]] = {}
            # Repeats go round the routers, so drift in what else the machine runs spreads
            # over all of them.
            for rep in range(args.repeats):
                for router in routers:
                    if f"{router}/{label}" in skipped:
                        continue  # it did not start before
                    t0 = time.monotonic()
                    say(f"{label}: {router}: {len(workload.arrivals)} requests, {pace}")
                    try:
                        res = await run_one(router, workload, rate, label, args)
                    except RouterError as e:
                        skipped[f"{router}/{label}"] = str(e).splitlines()[0]
                        say(f"  {router} did not start: {e}")
                        continue
                    each.setdefault(router, []).append(res)
                    all_rows.append(res.row)
                    if res.errors:
                        errors[f"{router}/{label}#{rep}"] = res.errors
                    say(f"  {json.dumps(res.row)} ({time.monotonic() - t0:.0f}s)")
            for router, results in each.items():
                runs.append(median_row(results))
                cdfs[(router, label)] = [t for r in results for t in r.ttfts]
    rank_rows(runs)
    overhead = [] if args.no_overhead else await run_overhead(routers, args)
    if args.plot and runs:
        plot(Path(args.plot), runs, cdfs)
    return {
        "runs": runs,
        "overhead": [
            {k: o[k] for k in ("router", "rps", "added_p50_ms", "added_p99_ms")} for o in overhead
        ],
        "overhead_detail": overhead,
        "runs_each": all_rows,
        "errors": errors,
        "skipped": skipped,
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("json_out", "plot", "router_cpu_set", "fleet_cpu_set")
        },
        "machine": machine(),
        "versions": versions(),
        "vllm_router": vllm_router_binary(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    result = asyncio.run(compare(args))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    if result["runs"]:
        if args.fleet == "vllm-cpu":
            from vllm_fleet import CPU_NOTE

            print(CPU_NOTE)
        print(format_runs(result["runs"]))
    if result["overhead"]:
        print(format_overhead(result["overhead"]))
    for what, why in result["skipped"].items():
        print(f"skipped {what}: {why}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
