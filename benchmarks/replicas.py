"""Several `kvroute proxy` replicas in front of one emulated fleet, with and without shared state.

    python benchmarks/replicas.py [--replicas 1,2,4] [--requests 200] [--concurrency 8]
        [--pods 4] [--speedup 1] [--no-shared] [--runs N] [--policy-file F] [--json OUT]

Method. For each replica count N and each mode (`local`: every replica routes on its own
state, as before issue 15; `shared`: the replicas share it through a real `redis-server`
this script starts on a free loopback port, `--save '' --appendonly no`, a fresh key prefix
per run), in that order, a fresh emulated fleet of `--pods` pods is started (cold caches,
the same seed and latency profile), N `kvroute proxy` processes start in front of it on the
same config (approximate prefix index on 64-character blocks: the router's own picks, no KV
events, so what one replica learned reaches another only through the store), and the
project's load generator (`router/loadgen.py`, chat, streaming) replays the `multi-turn`
workload of benchmarks/compare.py (3-8 turn sessions, each turn resending the history) in a
closed loop at `--concurrency`, sending request i to replica i mod N: a conversation's turns
land on different replicas, which is what an L4 load balancer in front of replicas does.

Figures per run: the fleet's prefix-cache hit rate (delta of the pods'
`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` over the run: what the
engines actually reused, independent of machine load), TTFT p50/p95 as the client saw them
(load dependent: on a shared machine compare runs of the same invocation only), failed
requests, and, in shared mode, the replicas' `kvroute_shared_state_*` figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import build_workload, pod_args, scrape_pods, warm_pods
from peers import free_port

from router.emulator.fleet import EmulatedFleet
from router.loadgen import LoadGenerator, LoadSettings


class RoundRobinLoad(LoadGenerator):
    """The load generator, with request i sent to replica i mod N."""

    def __init__(self, workload: Any, settings: LoadSettings, urls: list[str]) -> None:
        super().__init__(workload, settings)
        self.urls = urls
        self._n = 0

    def _base_url(self, a: Any) -> str:
        url = self.urls[self._n % len(self.urls)]
        self._n += 1
        return url


class Redis:
    """A throwaway redis-server on a free loopback port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit(
                "replicas: redis-server is not installed (apt-get install redis-server)"
            )
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def start_proxies(config_path: Path, n: int) -> list[tuple[subprocess.Popen[bytes], str]]:
    procs = []
    for _ in range(n):
        port = free_port()
        cmd = [sys.executable, "-m", "router.cli", "proxy", "--config", str(config_path),
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
        procs.append((subprocess.Popen(cmd), f"http://127.0.0.1:{port}"))
    async with httpx.AsyncClient(timeout=1.0) as client:
        for proc, url in procs:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"replicas: kvroute proxy exited ({proc.returncode})")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/ready")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"replicas: {url} not ready in 30 s")
                await asyncio.sleep(0.1)
    return procs


def stop_proxies(procs: list[tuple[subprocess.Popen[bytes], str]]) -> None:
    for proc, _ in procs:
        proc.terminate()
    for proc, _ in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def shared_figures(pages: list[str]) -> dict[str, float]:
    """The replicas' `kvroute_shared_state_*` figures: `up` the lowest, counters summed,
    gauges (lag, replicas seen) the highest."""
    out: dict[str, float] = {}
    for page in pages:
        for line in page.splitlines():
            if not line.startswith("kvroute_shared_state_"):
                continue
            name, text = line.split()[:2]
            key, value = name.removeprefix("kvroute_shared_state_"), float(text)
            if key not in out:
                out[key] = value
            elif key == "up":
                out[key] = min(out[key], value)
            elif key.endswith("_total"):
                out[key] += value
            else:
                out[key] = max(out[key], value)
    return out


async def run_one(n: int, shared: bool, args: argparse.Namespace, redis: Redis | None) -> dict:
    workload, _ = build_workload("multi-turn", args)
    async with (
        EmulatedFleet(
            pods=args.pods,
            events="none",
            pod_args=pod_args(args),
            speedup=args.speedup,
            stderr=subprocess.DEVNULL,
        ) as fleet,
        httpx.AsyncClient(timeout=10.0) as client,
    ):
        doc: dict[str, Any] = {
            "pods": [{"endpoint": p.endpoint, "models": [p.model]} for p in fleet.pods],
            "blocks": {"mode": "chars", "chars_per_block": 64},
            "prefix_index": {"mode": "approximate"},
            "seed": args.seed,
        }
        if args.policy_file:
            policy = yaml.safe_load(Path(args.policy_file).read_text())
            doc["plugins"] = policy["plugins"]
            doc["schedulingProfiles"] = policy["schedulingProfiles"]
        if shared:
            assert redis is not None
            doc["shared_state"] = {"url": redis.url, "prefix": f"bench-{uuid.uuid4().hex[:8]}"}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(doc, f)
            config_path = Path(f.name)
        await warm_pods(client, fleet)
        before = await scrape_pods(client, fleet)
        procs = await start_proxies(config_path, n)
        try:
            settings = LoadSettings(
                base_url=procs[0][1],
                model=fleet.pods[0].model,
                api="chat",
                concurrency=args.concurrency,
                timeout_s=args.timeout,
                max_tokens_cap=args.max_tokens,
            )
            gen = RoundRobinLoad(workload, settings, [url for _, url in procs])
            report = await gen.run()
            await asyncio.sleep(0.3)  # the last responses' counters land
            pages = [(await client.get(f"{url}/metrics")).text for _, url in procs]
        finally:
            stop_proxies(procs)
            config_path.unlink()
        after = await scrape_pods(client, fleet)
    hits = sum(a.hits - b.hits for a, b in zip(after, before, strict=True))
    queries = sum(a.queries - b.queries for a, b in zip(after, before, strict=True))
    s = report.summary()
    row: dict[str, Any] = {
        "replicas": n,
        "mode": "shared" if shared else "local",
        "requests": s["requests"],
        "failed": s["failed"],
        "hit_rate": round(hits / queries, 4) if queries else None,
        "ttft_p50_s": s["ttft_p50_s"],
        "ttft_p95_s": s["ttft_p95_s"],
        "requests_per_s": s["requests_per_s"],
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if shared:
        row["shared_state"] = shared_figures(pages)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="1,2,4", help="replica counts (default 1,2,4)")
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=65536)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shared", action="store_true", help="only the local-state runs")
    p.add_argument(
        "--runs", type=int, default=1, help="rounds of every configuration, medians reported"
    )
    p.add_argument(
        "--policy-file",
        default=None,
        help="route with this config's plugins and schedulingProfiles (e.g. "
        "configs/policies/llm-d-default.yaml) instead of the default profile",
    )
    p.add_argument("--json", default=None, help="write the rows here ('-' = stdout)")
    args = p.parse_args(argv)
    args.groups = 8  # build_workload's shared-prompt knob (unused by multi-turn)
    return args


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    counts = [int(x) for x in args.replicas.split(",")]
    redis = None if args.no_shared else Redis()
    rows = []
    try:
        for round_no in range(args.runs):
            for n in counts:
                modes = [False] if (n == 1 or args.no_shared) else [False, True]
                for shared in modes:
                    row = await run_one(n, shared, args, redis)
                    row["round"] = round_no
                    print_row(row)
                    rows.append(row)
    finally:
        if redis is not None:
            redis.stop()
    return rows


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['replicas']} replica(s) {row['mode']:6}: hit rate {row['hit_rate']}, "
        f"TTFT p50 {row['ttft_p50_s']} s p95 {row['ttft_p95_s']} s, "
        f"failed {row['failed']}/{row['requests']}, load {row['loadavg_1m']}",
        file=sys.stderr,
        flush=True,
    )


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (replicas, mode): the median over the rounds of hit rate and TTFT, and the hit
    rate's and TTFT p95's change against the single replica's median (points, ratio)."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["replicas"], row["mode"]), []).append(row)
    out = []
    for (n, mode), group in groups.items():
        med: dict[str, Any] = {"replicas": n, "mode": mode, "runs": len(group)}
        for key in ("hit_rate", "ttft_p50_s", "ttft_p95_s", "requests_per_s"):
            values = [r[key] for r in group if r[key] is not None]
            med[key] = round(statistics.median(values), 4) if values else None
        med["failed"] = sum(r["failed"] for r in group)
        out.append(med)
    single = next((m for m in out if m["replicas"] == 1), None)
    for med in out:
        if single and med["hit_rate"] is not None and single["hit_rate"] is not None:
            med["hit_rate_vs_single_pts"] = round(100 * (med["hit_rate"] - single["hit_rate"]), 2)
        if single and med["ttft_p95_s"] and single["ttft_p95_s"]:
            med["ttft_p95_vs_single"] = round(med["ttft_p95_s"] / single["ttft_p95_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(main_async(args))
    summary = medians(rows)
    if args.runs > 1:
        print(f"medians of {args.runs} rounds:", file=sys.stderr)
        for med in summary:
            print(f"  {json.dumps(med)}", file=sys.stderr)
    out = {"workload": "multi-turn", "pods": args.pods, "requests": args.requests,
           "concurrency": args.concurrency, "speedup": args.speedup, "rows": rows,
           "medians": summary}  # fmt: skip
    if args.json == "-":
        print(json.dumps(out, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
