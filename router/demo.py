"""`kvroute demo [--pd] [--json]`: cache-aware routing against round-robin, on one machine.

Starts an emulated fleet (4 pods of the Llama-3.1-8B/H100 profile at a speed-up), then for each
routing policy: clears the pods' prefix caches, starts the proxy with that policy, replays the
same multi-turn chat workload through it with the load generator, and reads the pods' prefix
cache counters (`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`, deltas).
`--pd` adds a run on a P/D fleet (2 prefill + 2 decode pods, two-phase flow in the proxy).
Prints a side-by-side table (or one JSON object with `--json`), stops every process, exits 0.

By default the proxy uses the approximate prefix index (learned from its own decisions) in
character mode. `--index precise` runs it on the pods' KV events instead: the fleet's config
puts the router in token mode on the pods' tokenizer, and the pods publish their KV events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet, FleetError
from router.loadgen import LoadSettings, format_table, run_load
from router.sim.workloads import LengthDistribution, Workload, make_workload

ROUND_ROBIN = """
plugins:
  - type: round-robin-picker
schedulingProfiles:
  - name: round-robin
    plugins:
      - {pluginRef: round-robin-picker}
"""

PD = """
plugins:
  - type: pd-profile-handler
    parameters: {threshold: 1024}
  - type: decode-filter
  - type: prefill-filter
  - type: prefix-cache-scorer
  - type: uncached-tokens-load-scorer
  - type: kv-cache-utilization-scorer
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: decode
    plugins:
      - {pluginRef: decode-filter}
      - {pluginRef: prefix-cache-scorer, weight: 3}
      - {pluginRef: kv-cache-utilization-scorer, weight: 1}
      - {pluginRef: queue-scorer, weight: 1}
      - {pluginRef: max-score-picker}
  - name: prefill
    plugins:
      - {pluginRef: prefill-filter}
      - {pluginRef: prefix-cache-scorer, weight: 3}
      - {pluginRef: uncached-tokens-load-scorer, weight: 2}
      - {pluginRef: max-score-picker}
"""

#: The default cache-aware profile is the config's default (router/config.py).
CACHE_AWARE = ""


def demo_workload(requests: int, seed: int) -> Workload:
    """Chat sessions with long shared histories: the case cache-aware routing is for."""
    return make_workload(
        "multi-turn",
        num_requests=requests,
        seed=seed,
        system_tokens=0,
        first_user=LengthDistribution(8000, 0.3, 256, 16_000),
        user=LengthDistribution(64, 0.5, 16, 512),
        output=LengthDistribution(32, 0.3, 8, 64),
        min_turns=6,
        max_turns=10,
        max_context=24_000,
    )


def proxy_config(fleet: EmulatedFleet, plugins_yaml: str, index: str = "approximate") -> str:
    if index == "precise":
        # Pods with their KV-event endpoints, blocks in token mode on the pods' tokenizer.
        doc: dict[str, Any] = fleet.config()
    else:
        pods = [{"endpoint": p.endpoint, "role": p.role, "models": [p.model]} for p in fleet.pods]
        doc = {
            "pods": pods,
            "blocks": {"mode": "chars", "chars_per_block": 64},
            "prefix_index": {"mode": "approximate"},
        }
    doc["scrape"] = {"interval_s": 0.1}
    doc["seed"] = 1
    return yaml.safe_dump(doc, sort_keys=False) + plugins_yaml


async def cache_counters(client: httpx.AsyncClient, fleet: EmulatedFleet) -> tuple[float, float]:
    """(hits, queries) summed over the fleet's pods, in tokens."""
    hits = queries = 0.0
    for pod in fleet.pods:
        text = (await client.get(f"{pod.url}/metrics")).text
        for family in text_string_to_metric_families(text):
            if family.name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
                total = sum(s.value for s in family.samples if s.name.endswith("_total"))
                if family.name.endswith("hits"):
                    hits += total
                else:
                    queries += total
    return hits, queries


@contextlib.asynccontextmanager
async def proxy_process(config_yaml: str) -> AsyncIterator[str]:
    """`kvroute proxy` in its own process (as a user runs it); yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="kvroute-demo-") as tmp:
        path = Path(tmp) / "router.yaml"
        path.write_text(config_yaml)
        parse_config(config_yaml, str(path))  # a bad config fails here, with its message
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.cli", "proxy", "--config", str(path),
            "--port", str(port), "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            await _wait_ready(url, proc)
            yield url
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _wait_ready(url: str, proc: asyncio.subprocess.Process, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"the proxy exited with {proc.returncode} before ready")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the proxy at {url} was not ready within {timeout_s:g}s")


async def run_policy(
    fleet: EmulatedFleet,
    plugins_yaml: str,
    workload: Workload,
    concurrency: int,
    index: str = "approximate",
) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        for pod in fleet.pods:
            await client.post(f"{pod.url}/reset_prefix_cache")
        hits0, queries0 = await cache_counters(client, fleet)
        async with proxy_process(proxy_config(fleet, plugins_yaml, index)) as url:
            settings = LoadSettings(
                base_url=url, model=fleet.pods[0].model, api="chat", concurrency=concurrency
            )
            report = await run_load(workload, settings)
        hits1, queries1 = await cache_counters(client, fleet)
    summary = report.summary()
    dq = queries1 - queries0
    summary["hit_rate"] = round((hits1 - hits0) / dq, 4) if dq > 0 else 0.0
    return summary


async def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    workload = demo_workload(args.requests, args.seed)
    out: dict[str, Any] = {}
    say = (lambda *_a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    t0 = time.monotonic()
    events = "bind" if args.index == "precise" else "none"
    say(f"starting {args.pods} emulated pods (speed-up {args.speedup:g}x)...")
    async with EmulatedFleet(
        pods=args.pods, speedup=args.speedup, events=events, stderr=asyncio.subprocess.DEVNULL
    ) as fleet:
        for name, plugins in (("round_robin", ROUND_ROBIN), ("cache_aware", CACHE_AWARE)):
            say(f"{name}: {len(workload.arrivals)} chat requests at concurrency {args.concurrency}")
            out[name] = await run_policy(fleet, plugins, workload, args.concurrency, args.index)
    if args.pd:
        prefill = args.pods // 2
        say(f"pd: {prefill} prefill + {args.pods - prefill} decode pods")
        async with EmulatedFleet(
            pods=args.pods,
            pd=(prefill, args.pods - prefill),
            speedup=args.speedup,
            events=events,
            stderr=asyncio.subprocess.DEVNULL,
        ) as fleet:
            out["pd"] = await run_policy(fleet, PD, workload, args.concurrency, args.index)
    rr, ca = out["round_robin"], out["cache_aware"]
    if rr.get("ttft_p50_s") and ca.get("ttft_p50_s"):
        out["ttft_p50_speedup"] = round(rr["ttft_p50_s"] / ca["ttft_p50_s"], 2)
    turns = sorted({a.session for a in workload.arrivals})
    out["workload"] = (
        f"multi-turn chat, {len(turns)} sessions of 6-10 turns, {len(workload.arrivals)} "
        f"requests per policy, concurrency {args.concurrency}, no think time"
    )
    out["prefix_index"] = args.index
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="emulated fleet + proxy + load: cache-aware routing vs round-robin, side by side",
    )
    p.add_argument("--pd", action="store_true", help="also run a 2 prefill + 2 decode fleet")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--index",
        choices=("approximate", "precise"),
        default="approximate",
        help="prefix index of the cache-aware runs: own picks (default) or the pods' KV events",
    )
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--speedup", type=float, default=2.0, help="emulated s per wall s")
    p.add_argument("--requests", type=int, default=160, help="requests per policy")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)
    if args.pods < 2 or (args.pd and args.pods < 2):
        print("kvroute demo: needs at least 2 pods", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(run_demo(args))
    except FleetError as e:
        print(f"kvroute demo: the emulated fleet did not start: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
        return 0
    rows = {k: v for k, v in out.items() if isinstance(v, dict)}
    print(f"workload: {out['workload']}")
    print(format_table(rows))
    if "ttft_p50_speedup" in out:
        print(f"\ncache-aware TTFT p50 is {out['ttft_p50_speedup']:.1f}x lower than round-robin")
    return 0
