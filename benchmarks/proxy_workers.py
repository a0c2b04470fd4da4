"""`kvroute proxy --workers 2` against `--workers 1`: requests/s and CPU per request.

Method: four zero-latency pods (benchmarks/zero_latency_pod.py, one process) answer a small
non-streaming completion at once; `kvroute proxy --workers N` fronts them. From this process an
aiohttp closed loop keeps `--concurrency` requests in flight for `--seconds` (64 keep-alive
connections, so the kernel spreads connections, not requests, over the workers). CPU time is
read from /proc for every proxy process (supervisor and workers) before and after each run;
the per-worker split shows how evenly the shared socket spread the connections. Each figure is
the median of `--runs` runs.

On a 2-core machine the load generator and the pods share the cores with the workers, so the
requests/s ratio is bounded well below 2: read it together with CPU per request (which does not
depend on what else runs) and the machine's load average, printed alongside.

    python benchmarks/proxy_workers.py [--workers 1 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_load import Child, closed_loop, cpu_seconds, python
from peers import free_port

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"model": "m", "prompt": "The quick brown fox " * 8, "max_tokens": 1}).encode()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _wait_ready(url: str, workers: int, pid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready and (workers == 1 or len(_children(pid)) == workers):
            # Every worker answers its own /ready only once its lifespan ran; give the
            # later ones a moment after the first.
            time.sleep(2.0 if workers > 1 else 0.0)
            return
        time.sleep(0.1)
    raise RuntimeError(f"proxy at {url} not ready")


async def _one_run(url: str, concurrency: int, seconds: float, pids: list[int]) -> dict:
    before = [cpu_seconds(p) for p in pids]
    run = await closed_loop(url, BODY, concurrency, seconds=seconds)
    per_process = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    if run.failed:
        raise SystemExit(f"{run.failed} of {run.requests} requests failed")
    cpu = sum(per_process)
    return {
        "rps": run.rps,
        "cpu_us_per_request": cpu / max(1, run.requests) * 1e6,
        "cpu_cores_used": cpu / seconds,
        "p50_ms": run.percentile_ms(50),
        "p99_ms": run.percentile_ms(99),
        # Share of the proxy's CPU per process, supervisor first (the split over workers).
        "cpu_share": [round(c / cpu, 3) if cpu else 0.0 for c in per_process],
    }


def measure(workers: int, endpoints: list[str], args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        lines = ["pods:"] + [f"  - {{endpoint: '{ep}', models: [m]}}" for ep in endpoints]
        config.write_text("\n".join(lines) + "\nblocks: {mode: chars}\n")
        port = free_port()
        proc = subprocess.Popen(
            python(
                "-m", "router.cli", "proxy", "--config", str(config), "--port", str(port),
                "--workers", str(workers), "--log-level", "warning",
            ),
            cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, workers, proc.pid)
            pids = [proc.pid, *_children(proc.pid)]
            runs = [
                asyncio.run(_one_run(f"{url}/v1/completions", args.concurrency, args.seconds, pids))
                for _ in range(args.runs)
            ]
        finally:
            proc.terminate()
            proc.wait(20)
    out = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0] if k != "cpu_share"}
    out["cpu_share"] = runs[len(runs) // 2]["cpu_share"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    pods = Child(python(str(HERE / "zero_latency_pod.py"), "--ports", "0", "0", "0", "0"))
    try:
        endpoints = [f"127.0.0.1:{p}" for p in pods.ready]
        results = {str(w): measure(w, endpoints, args) for w in args.workers}
    finally:
        pods.stop()
    out = {
        "workers": results,
        "rps_ratio": round(
            results[str(args.workers[-1])]["rps"] / results[str(args.workers[0])]["rps"], 3
        ),
        "cores": os.cpu_count(),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "runs": args.runs,
        "seconds": args.seconds,
        "concurrency": args.concurrency,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'workers':<10}{'req/s':>10}{'CPU us/req':>12}{'cores used':>12}{'p50 ms':>9}"
          f"{'p99 ms':>9}  CPU share (supervisor, workers...)")  # fmt: skip
    for w, r in results.items():
        print(f"{w:<10}{r['rps']:>10,.0f}{r['cpu_us_per_request']:>12.0f}"
              f"{r['cpu_cores_used']:>12.2f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}  "
              f"{r['cpu_share']}")  # fmt: skip
    print(f"req/s ratio {args.workers[-1]} vs {args.workers[0]} workers: {out['rps_ratio']:.2f} "
          f"({out['cores']} cores shared with the load generator and the pods; load average "
          f"{out['loadavg_1m_before']} before, {out['loadavg_1m_after']} after)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
