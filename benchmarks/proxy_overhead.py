"""What the proxy adds: latency at concurrency 1 and throughput at concurrency 64.

Method: four zero-latency pods (benchmarks/zero_latency_pod.py, one process) answer a small non-
streaming completion at once; `kvroute proxy` (its own process, default cache-aware profile,
metrics scraping on) fronts them. From this process, an aiohttp closed loop sends the same
completion body:
- concurrency 1, `--count` requests straight to one pod ("direct") and through the proxy; the
  added latency is proxy minus direct at p50 and at p99;
- concurrency 64 for `--seconds` through the proxy (requests/s), and direct for reference. Each
  figure is the median of `--runs` runs. The proxy's CPU time per request during the c=64 run is
  reported too: unlike requests/s it does not depend on what else the machine runs. Emulator
  pods are not used here: they model GPU time and cost more CPU per request than the proxy, so
  on 2 cores they would measure themselves. Targets: <= 1 ms added p50 at c=1, >= 1,500
  requests/s at c=64 on 2 cores. At c=64 the added p99 (proxy p99 minus direct p99, both c=64)
  and the proxy's event-loop lag p99 (`kvroute_event_loop_lag_seconds`, diffed over the run)
  name the tail: a loop lag near the added p99 means the proxy's own loop stalled.

    python benchmarks/proxy_overhead.py [--json]

"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import histogram_quantile
from http_load import Child, closed_loop, cpu_seconds, python
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"model": "m", "prompt": "The quick brown fox " * 8, "max_tokens": 1}).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"proxy at {url} not ready")


class _Proxy:
    def __init__(self, config: Path, port: int) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            python(
                "-m",
                "router.cli",
                "proxy",
                "--config",
                str(config),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ),
            cwd=HERE.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def loop_lag_buckets(metrics_url: str) -> dict[float, float]:
    """The proxy's `kvroute_event_loop_lag_seconds` histogram: upper bound → cumulative count."""
    text = httpx.get(metrics_url, timeout=5.0).text
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "kvroute_event_loop_lag_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    out[float(s.labels["le"])] = s.value
    return out


def lag_p99_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """p99 of the loop lag sampled between two scrapes (ms); NaN when nothing was sampled."""
    delta = tuple((le, n - before.get(le, 0.0)) for le, n in sorted(after.items()))
    p99 = histogram_quantile(delta, 0.99)
    return float("nan") if p99 is None else p99 * 1000


async def _one_run(
    direct: str, proxied: str, count: int, seconds: float, proxy_pid: int
) -> dict[str, float]:
    metrics_url = proxied.replace("/v1/completions", "/metrics")
    d1 = await closed_loop(direct, BODY, 1, count=count)
    p1 = await closed_loop(proxied, BODY, 1, count=count)
    cpu0 = cpu_seconds(proxy_pid)
    lag0 = await asyncio.to_thread(loop_lag_buckets, metrics_url)
    p64 = await closed_loop(proxied, BODY, 64, seconds=seconds)
    cpu = cpu_seconds(proxy_pid) - cpu0
    lag1 = await asyncio.to_thread(loop_lag_buckets, metrics_url)
    for run in (d1, p1, p64):
        if run.failed:
            raise SystemExit(f"{run.failed} of {run.requests} requests failed")
    d64 = await closed_loop(direct, BODY, 64, seconds=seconds)
    return {
        "direct_p50_ms": d1.percentile_ms(50),
        "direct_p99_ms": d1.percentile_ms(99),
        "proxy_p50_ms": p1.percentile_ms(50),
        "proxy_p99_ms": p1.percentile_ms(99),
        "added_p50_ms": p1.percentile_ms(50) - d1.percentile_ms(50),
        "added_p99_ms": p1.percentile_ms(99) - d1.percentile_ms(99),
        "proxy_rps_c64": p64.rps,
        "direct_rps_c64": d64.rps,
        "proxy_p99_ms_c64": p64.percentile_ms(99),
        "direct_p99_ms_c64": d64.percentile_ms(99),
        "added_p99_ms_c64": p64.percentile_ms(99) - d64.percentile_ms(99),
        # The proxy's own event-loop lag during the c=64 run (its probe, every 20 ms).
        "loop_lag_p99_ms": lag_p99_ms(lag0, lag1),
        "proxy_failed_c64": float(p64.failed),
        # Load-independent: what one request costs the proxy (the machine may be shared).
        "proxy_cpu_us_per_request": cpu / max(1, p64.requests) * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000, help="requests per c=1 run")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a c=64 run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    pods = Child(python(str(HERE / "zero_latency_pod.py"), "--ports", "0", "0", "0", "0"))
    proxy = None
    try:
        endpoints = [f"127.0.0.1:{p}" for p in pods.ready]
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "bench.yaml"
            lines = ["pods:"] + [f"  - {{endpoint: '{ep}', models: [m]}}" for ep in endpoints]
            config.write_text("\n".join(lines) + "\nblocks: {mode: chars}\n")
            port = _free_port()
            proxy = _Proxy(config, port)
            _wait_ready(f"http://127.0.0.1:{port}")
            runs = [
                asyncio.run(
                    _one_run(
                        f"http://{endpoints[0]}/v1/completions",
                        f"http://127.0.0.1:{port}/v1/completions",
                        args.count,
                        args.seconds,
                        proxy.proc.pid,
                    )
                )
                for _ in range(args.runs)
            ]
    finally:
        if proxy is not None:
            proxy.stop()
        pods.stop()
    out = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    out["runs"] = args.runs
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'':<28}{'direct':>10}{'proxy':>10}{'added':>10}")
    print(f"{'c=1 p50 (ms)':<28}{out['direct_p50_ms']:>10.3f}{out['proxy_p50_ms']:>10.3f}"
          f"{out['added_p50_ms']:>10.3f}")  # fmt: skip
    print(f"{'c=1 p99 (ms)':<28}{out['direct_p99_ms']:>10.3f}{out['proxy_p99_ms']:>10.3f}"
          f"{out['added_p99_ms']:>10.3f}")  # fmt: skip
    print(f"{'c=64 requests/s':<28}{out['direct_rps_c64']:>10,.0f}{out['proxy_rps_c64']:>10,.0f}")
    print(f"{'c=64 p99 (ms)':<28}{out['direct_p99_ms_c64']:>10.3f}{out['proxy_p99_ms_c64']:>10.3f}"
          f"{out['added_p99_ms_c64']:>10.3f}")  # fmt: skip
    print(f"proxy event-loop lag p99 during c=64: {out['loop_lag_p99_ms']:.2f} ms")
    cpu = out["proxy_cpu_us_per_request"]
    print(f"proxy CPU per request: {cpu:.0f} us (one core: ~{1e6 / cpu:,.0f} req/s)")
    print(f"(median of {args.runs} runs; targets: added p50 <= 1 ms, proxy >= 1,500 req/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
