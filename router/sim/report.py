"""Simulation results: per-request records → per-policy figures → table, JSON and charts.

Owns the definition of every reported figure:

- `hit_rate`: prompt tokens served from the prefix cache of the pod that ran the prefill
  (as the engines measured it) / all prompt tokens. Token-weighted.
- TTFT = first token − arrival; TPOT = (finish − first token) / (output tokens − 1), over
  requests with at least 2 output tokens; E2E = finish − arrival. Percentiles are numpy's
  linear interpolation.
- `output_tokens_per_s` = output tokens / makespan (first arrival → last finish);
  `per_gpu_tokens_per_s` divides that by the fleet's GPUs (pods × TP); `requests_per_s` =
  completed requests / makespan. `ttft_mean_s` and `ttft_p90_s` sit beside the percentiles.
- Arrival = when the client sent the request. With a cap on outstanding requests
  (`--max-outstanding`) a request due while the cap is reached waits on the client first;
  that wait is not in TTFT (as inference-perf and guidellm measure) but is reported as
  `client_wait_mean_s`.
- Warm-up: requests *scheduled* before `warmup_s` are left out of every figure (they still
  ran and warmed the caches); the makespan then starts at the first measured arrival.
- `imbalance` = max / mean engine busy time (sum of step durations) over the pods of one role,
  the worst role when a fleet has several (prefill and decode pods are not comparable).
- `hit_rate_vs_oracle` = hit_rate / the `oracle-pooled` policy's hit rate in the same workload.
- TTFT floor (`ttft_floor_p50_s`, `ttft_floor_p95_s`, per workload): each measured request's
  TTFT had it run alone on an idle pod of the fleet's fastest profile, with the most cached
  tokens any policy in the run got for it, plus the router overhead. No routing beats it, so
  `best peer p95 / floor p95` bounds what a better router can still win on a workload: when
  the peers' p95 is within 1.25x of the floor, a 0.8x ratio is out of reach of any router.

The JSON carries no wall-clock values and rounds floats to 6 significant digits, so the same
seed gives byte-identical output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    #: The arrival's index in its workload.
    index: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    #: When the workload scheduled it (≤ arrival_s; earlier when the client cap held it).
    scheduled_s: float | None = None


@dataclass(slots=True)
class PodUsage:
    endpoint: str
    role: str
    gpus: int
    busy_s: float
    preemptions: int


@dataclass(slots=True)
class PolicyResult:
    name: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    hit_rate: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p95_s: float
    e2e_p50_s: float
    output_tokens_per_s: float
    per_gpu_tokens_per_s: float
    imbalance: float
    preemptions: int
    gpus: int
    makespan_s: float
    hit_rate_vs_oracle: float | None = None
    ttft_mean_s: float = 0.0
    ttft_p90_s: float = 0.0
    requests_per_s: float = 0.0
    client_wait_mean_s: float = 0.0
    #: Requests left out of the figures as warm-up.
    warmup_requests: int = 0
    #: Not in the JSON: kept for charts.
    ttfts: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _JSON_FIELDS:
            out[name] = round_figure(getattr(self, name))
        return out


_JSON_FIELDS = (
    "name",
    "requests",
    "prompt_tokens",
    "output_tokens",
    "hit_rate",
    "hit_rate_vs_oracle",
    "ttft_p50_s",
    "ttft_p95_s",
    "ttft_p99_s",
    "ttft_mean_s",
    "ttft_p90_s",
    "tpot_p50_s",
    "tpot_p95_s",
    "e2e_p50_s",
    "output_tokens_per_s",
    "per_gpu_tokens_per_s",
    "imbalance",
    "preemptions",
    "gpus",
    "makespan_s",
    "requests_per_s",
    "client_wait_mean_s",
    "warmup_requests",
)


@dataclass(slots=True)
class WorkloadResult:
    name: str
    fleet: str
    description: str
    policies: list[PolicyResult]
    concurrency: int | None = None
    #: Sweep point of an open-loop rate (`--rate a,b,...`) or trace speedup (`--speedup`).
    rate_per_s: float | None = None
    speedup: float | None = None
    max_outstanding: int | None = None
    warmup_s: float = 0.0
    #: See the module docstring; None when no request was measured.
    ttft_floor_p50_s: float | None = None
    ttft_floor_p95_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "fleet": self.fleet}
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency
        for key in ("rate_per_s", "speedup", "max_outstanding"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round_figure(value)
        if self.warmup_s:
            out["warmup_s"] = round_figure(self.warmup_s)
        if self.ttft_floor_p95_s is not None:
            out["ttft_floor_p50_s"] = round_figure(self.ttft_floor_p50_s)
            out["ttft_floor_p95_s"] = round_figure(self.ttft_floor_p95_s)
        out["policies"] = [p.to_json() for p in self.policies]
        return out


def round_figure(v: Any) -> Any:
    """A float to 6 significant digits (non-finite → None), the simulator's JSON rounding."""
    if isinstance(v, float):
        if not math.isfinite(v) or v == 0.0:
            return v if math.isfinite(v) else None
        return float(f"{v:.6g}")
    return v


def _scheduled(r: RequestRecord) -> float:
    return r.arrival_s if r.scheduled_s is None else r.scheduled_s


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def summarize(
    name: str,
    records: Sequence[RequestRecord],
    pods: Sequence[PodUsage],
    warmup_s: float = 0.0,
) -> PolicyResult:
    """Figures of one policy's run from its completed requests and its pods' usage; requests
    scheduled before `warmup_s` are left out."""
    total = len(records)
    if warmup_s > 0:
        records = [r for r in records if _scheduled(r) >= warmup_s]
    n = len(records)
    sched = np.fromiter((_scheduled(r) for r in records), float, n)
    arrival = np.fromiter((r.arrival_s for r in records), float, n)
    first = np.fromiter((r.first_token_s for r in records), float, n)
    finish = np.fromiter((r.finish_s for r in records), float, n)
    out_tok = np.fromiter((r.output_tokens for r in records), float, n)
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    ttft = first - arrival
    multi = out_tok > 1
    tpot = (finish[multi] - first[multi]) / (out_tok[multi] - 1)
    makespan = float(finish.max() - arrival.min()) if n else 0.0
    gpus = sum(p.gpus for p in pods)
    total_out = int(out_tok.sum())
    tps = total_out / makespan if makespan > 0 else 0.0
    imbalance = 0.0
    for role in sorted({p.role for p in pods}):
        busy = [p.busy_s for p in pods if p.role == role]
        mean = sum(busy) / len(busy)
        if mean > 0:
            imbalance = max(imbalance, max(busy) / mean)
    return PolicyResult(
        name=name,
        requests=n,
        prompt_tokens=prompt,
        output_tokens=total_out,
        hit_rate=cached / prompt if prompt else 0.0,
        ttft_p50_s=_pct(ttft, 50),
        ttft_p95_s=_pct(ttft, 95),
        ttft_p99_s=_pct(ttft, 99),
        tpot_p50_s=_pct(tpot, 50),
        tpot_p95_s=_pct(tpot, 95),
        e2e_p50_s=_pct(finish - arrival, 50),
        output_tokens_per_s=tps,
        per_gpu_tokens_per_s=tps / gpus if gpus else 0.0,
        imbalance=imbalance,
        preemptions=sum(p.preemptions for p in pods),
        gpus=gpus,
        makespan_s=makespan,
        ttft_mean_s=float(ttft.mean()) if n else 0.0,
        ttft_p90_s=_pct(ttft, 90),
        requests_per_s=n / makespan if makespan > 0 else 0.0,
        client_wait_mean_s=float((arrival - sched).mean()) if n else 0.0,
        warmup_requests=total - n,
        ttfts=np.sort(ttft),
        records=list(records),
    )


def attach_oracle_ratio(result: WorkloadResult) -> None:
    """Fill `hit_rate_vs_oracle` when the workload ran the `oracle-pooled` policy."""
    oracle = next((p for p in result.policies if p.name == "oracle-pooled"), None)
    if oracle is None or oracle.hit_rate <= 0:
        return
    for p in result.policies:
        p.hit_rate_vs_oracle = p.hit_rate / oracle.hit_rate


def attach_ttft_floor(
    result: WorkloadResult, alone_s: Callable[[int, int], float], overhead_s: float
) -> None:
    """Fill the workload's TTFT floor; `alone_s(prompt, cached)` is a prompt's prefill time
    alone on an idle pod with `cached` tokens already in its cache."""
    best: dict[int, tuple[int, int]] = {}
    for p in result.policies:
        for r in p.records:
            prev = best.get(r.index)
            if prev is None or r.cached_tokens > prev[1]:
                best[r.index] = (r.prompt_tokens, r.cached_tokens)
    if not best:
        return
    floors = np.fromiter((alone_s(n, c) + overhead_s for n, c in best.values()), float, len(best))
    result.ttft_floor_p50_s = _pct(floors, 50)
    result.ttft_floor_p95_s = _pct(floors, 95)


def to_json(results: Sequence[WorkloadResult]) -> str:
    return json.dumps({"workloads": [r.to_json() for r in results]}, indent=2)


_COLUMNS = (
    ("policy", "name", "{}"),
    ("reqs", "requests", "{:d}"),
    ("prompt tok", "prompt_tokens", "{:,d}"),
    ("hit", "hit_rate", "{:.1%}"),
    ("hit/orc", "hit_rate_vs_oracle", "{:.0%}"),
    ("TTFT mean", "ttft_mean_s", "{:.3f}"),
    ("p50", "ttft_p50_s", "{:.3f}"),
    ("p90", "ttft_p90_s", "{:.3f}"),
    ("p95", "ttft_p95_s", "{:.3f}"),
    ("p99", "ttft_p99_s", "{:.3f}"),
    ("TPOT p50", "tpot_p50_s", "{:.4f}"),
    ("p95", "tpot_p95_s", "{:.4f}"),
    ("E2E p50", "e2e_p50_s", "{:.2f}"),
    ("out tok/s", "output_tokens_per_s", "{:,.0f}"),
    ("req/s", "requests_per_s", "{:.2f}"),
    ("tok/s/GPU", "per_gpu_tokens_per_s", "{:,.0f}"),
    ("imbal", "imbalance", "{:.2f}"),
    ("preempt", "preemptions", "{:d}"),
)


def _load_label(r: WorkloadResult) -> str:
    parts = []
    if r.concurrency:
        parts.append(f"concurrency {r.concurrency}")
    if r.rate_per_s is not None:
        parts.append(f"rate {r.rate_per_s:g} req/s")
    if r.speedup is not None:
        parts.append(f"speedup {r.speedup:g}")
    if r.max_outstanding is not None:
        parts.append(f"max outstanding {r.max_outstanding}")
    if r.warmup_s:
        parts.append(f"warm-up {r.warmup_s:g}s excluded")
    return "".join(f", {p}" for p in parts)


def format_table(results: Sequence[WorkloadResult]) -> str:
    """One text table per workload; times in seconds."""
    blocks = []
    for r in results:
        rows = [[head for head, _, _ in _COLUMNS]]
        for p in r.policies:
            row = []
            for _, attr, fmt in _COLUMNS:
                v = getattr(p, attr)
                row.append("-" if v is None else fmt.format(v))
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        title = f"workload {r.name} ({r.description}) on fleet {r.fleet}{_load_label(r)}"
        if r.ttft_floor_p95_s is not None:
            lines.append(
                f"TTFT floor (each request alone on an idle pod, best cache of any policy): "
                f"p50 {r.ttft_floor_p50_s:.3f}  p95 {r.ttft_floor_p95_s:.3f}"
            )
        blocks.append("\n".join([title, *lines]))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------- charts
def _throughput_by_concurrency(
    records: Sequence[RequestRecord], window_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per time window: mean requests in flight and output tokens/s, spreading each request's
    output tokens evenly from its first token to its finish."""
    if not records:
        return np.zeros(0), np.zeros(0)
    start = min(r.arrival_s for r in records)
    end = max(r.finish_s for r in records)
    n = max(1, math.ceil((end - start) / window_s))
    edges = start + window_s * np.arange(n + 1)
    inflight = np.zeros(n)
    tokens = np.zeros(n)
    lo = edges[:-1]
    hi = edges[1:]
    for r in records:
        inflight += np.clip(np.minimum(hi, r.finish_s) - np.maximum(lo, r.arrival_s), 0, None)
        span = r.finish_s - r.first_token_s
        if span > 0:
            overlap = np.clip(np.minimum(hi, r.finish_s) - np.maximum(lo, r.first_token_s), 0, None)
            tokens += r.output_tokens * overlap / span
    return inflight / window_s, tokens / window_s


def plotting_unavailable() -> str | None:
    """Why `write_plots` cannot run here (matplotlib missing), or None; checked before a
    long run so the user learns it up front, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or `pip install 'kvroute[plot]'`), or drop --plot"
        )
    return None


def write_plots(results: Sequence[WorkloadResult], directory: str | Path) -> list[Path]:
    """TTFT CDF per policy, hit rate per policy, throughput vs concurrency; one PNG each per
    workload (plus a sweep chart when a workload ran at several closed-loop concurrencies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for i, r in enumerate(results):
        stem = f"{i:02d}-{r.name}" + (f"-c{r.concurrency}" if r.concurrency else "")
        fig, ax = plt.subplots(figsize=(8.5, 4.8))
        for p in r.policies:
            if len(p.ttfts):
                y = np.arange(1, len(p.ttfts) + 1) / len(p.ttfts)
                ax.plot(p.ttfts, y, label=p.name)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF — {r.name} on {r.fleet}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, f"{stem}-ttft-cdf.png")

        fig, ax = plt.subplots(figsize=(8.5, 4.8))
        names = [p.name for p in r.policies]
        ax.bar(names, [p.hit_rate for p in r.policies], color="tab:blue")
        ax.set_ylabel("prefix-cache hit rate (token-weighted)")
        ax.set_ylim(0, 1)
        ax.set_title(f"Hit rate — {r.name} on {r.fleet}")
        ax.tick_params(axis="x", rotation=30)
        save(fig, f"{stem}-hit-rate.png")

        fig, ax = plt.subplots(figsize=(8.5, 4.8))
        for p in r.policies:
            window = max(0.5, p.makespan_s / 100)
            conc, tput = _throughput_by_concurrency(p.records, window)
            ax.scatter(conc, tput, s=8, alpha=0.6, label=p.name)
        ax.set_xlabel("requests in flight (window mean)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"Throughput vs concurrency — {r.name} on {r.fleet}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, f"{stem}-throughput-vs-concurrency.png")

    sweeps: dict[str, list[WorkloadResult]] = {}
    for r in results:
        if r.concurrency is not None:
            sweeps.setdefault(r.name, []).append(r)
    for name, runs in sweeps.items():
        if len({r.concurrency for r in runs}) < 2:
            continue
        fig, (ax, ax_gpu) = plt.subplots(1, 2, figsize=(12, 4.8))
        lines: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
        for r in runs:
            for p in r.policies:
                point = (r.concurrency or 0, p.output_tokens_per_s, p.per_gpu_tokens_per_s)
                lines.setdefault((r.fleet, p.name), []).append(point)
        for (fleet, pname), pts in lines.items():
            pts.sort()
            xs = [x for x, _, _ in pts]
            label = f"{fleet} {pname}"
            ax.plot(xs, [y for _, y, _ in pts], marker="o", label=label)
            ax_gpu.plot(xs, [g for _, _, g in pts], marker="o", label=label)
        for a, ylabel in ((ax, "output tokens/s"), (ax_gpu, "output tokens/s per GPU")):
            a.set_xscale("log", base=2)
            a.set_xlabel("concurrency (closed loop)")
            a.set_ylabel(ylabel)
            a.grid(True, alpha=0.3)
        ax.set_title(f"Throughput vs concurrency — {name}")
        ax_gpu.legend(fontsize=7)
        save(fig, f"sweep-{name}-throughput-vs-concurrency.png")
    return written
