"""A public LLM load tool (guidellm) against `kvroute proxy` in front of an emulated fleet.

    python benchmarks/run_load_tool.py [--guidellm PATH] [--pods N] [--speedup X]
        [--scenario benchmarks/loadtools/guidellm-multiturn.yaml] [--out DIR]

Starts an emulated fleet (KV events on, as in compare.py) and the kvroute proxy with its
default profile (benchmarks/peers.py), fills the scenario's target, model and tokenizer (kvroute's
bundled tokenizer directory, so guidellm downloads nothing; HF_HUB_OFFLINE=1 is set too) and
runs `guidellm run --scenario ...` with a JSON report. Prints what guidellm measured (requests
completed and errored, TTFT, ITL, output tokens/s) and the fleet's prefix-cache hit rate, and
exits with guidellm's status. guidellm needs its own environment (it pins torch and
transformers): `python -m venv /tmp/lt && /tmp/lt/bin/pip install guidellm`, then
`--guidellm /tmp/lt/bin/guidellm` (default: `guidellm` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare import fleet_view
from peers import ROUTERS, RouterProcess

from router.blocks import BUNDLED_TOKENIZER
from router.demo import cache_counters
from router.emulator.fleet import EmulatedFleet

HERE = Path(__file__).resolve().parent
DEFAULT_SCENARIO = HERE / "loadtools" / "guidellm-multiturn.yaml"


def scenario_for(template: Path, target: str, model: str, out_json: Path) -> dict[str, Any]:
    doc = yaml.safe_load(template.read_text())
    spec = doc.setdefault("spec", {})
    spec.setdefault("backend", {}).update({"target": target, "model": model})
    spec.setdefault("tokenizer", {"kind": "huggingface_auto"})["model"] = str(
        Path(BUNDLED_TOKENIZER).parent
    )
    spec["outputs"] = [{"kind": "json", "path": str(out_json)}]
    return doc


def _stat(metric: dict[str, Any] | None, key: str) -> float | None:
    """A statistic of a guidellm metric over successful requests (its report's shape)."""
    if not isinstance(metric, dict):
        return None
    node = metric.get("successful", metric)
    if not isinstance(node, dict):
        return None
    if key in node:
        return node[key]
    pct = node.get("percentiles") or {}
    return pct.get(key)


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark in a guidellm JSON report."""
    rows = []
    for bench in report.get("benchmarks", []):
        metrics = bench.get("metrics", {})
        totals = metrics.get("request_totals") or bench.get("request_totals") or {}
        rows.append(
            {
                "successful": totals.get("successful"),
                "errored": totals.get("errored"),
                "incomplete": totals.get("incomplete"),
                "ttft_p50_ms": _stat(metrics.get("time_to_first_token_ms"), "p50"),
                "ttft_p95_ms": _stat(metrics.get("time_to_first_token_ms"), "p95"),
                "itl_p50_ms": _stat(metrics.get("inter_token_latency_ms"), "p50"),
                "output_tokens_per_s": _stat(metrics.get("output_tokens_per_second"), "mean"),
                "requests_per_s": _stat(metrics.get("requests_per_second"), "mean"),
            }
        )
    return rows


async def run(args: argparse.Namespace) -> int:
    guidellm = shutil.which(args.guidellm) or args.guidellm
    if not Path(guidellm).exists():
        print(f"run_load_tool: guidellm not found ({args.guidellm}); see the docstring")
        return 2
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="guidellm-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    pod_args = ["--events-wire-form", "map", "--events-topic", ""]
    async with (
        EmulatedFleet(
            pods=args.pods,
            events="bind",
            pod_args=pod_args,
            speedup=args.speedup,
            stderr=subprocess.DEVNULL,
        ) as fleet,
        httpx.AsyncClient(timeout=10.0) as client,
    ):
        hits0, queries0 = await cache_counters(client, fleet)
        async with RouterProcess(ROUTERS["kvroute"], fleet_view(fleet)) as proxy:
            report_path = out_dir / "guidellm.json"
            doc = scenario_for(Path(args.scenario), proxy.url, fleet.pods[0].model, report_path)
            scenario = out_dir / "scenario.yaml"
            scenario.write_text(yaml.safe_dump(doc, sort_keys=False))
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            cmd = [guidellm, "run", "--scenario", str(scenario), "--disable-console-interactive"]
            print("$", " ".join(cmd), flush=True)
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdout=None, stderr=None, stdin=subprocess.DEVNULL
            )
            code = await proc.wait()
            wall = time.monotonic() - t0
        hits1, queries1 = await cache_counters(client, fleet)
    dq = queries1 - queries0
    hit_rate = (hits1 - hits0) / dq if dq > 0 else 0.0
    print(f"\nguidellm exited with {code} after {wall:.0f}s; report: {report_path}")
    if report_path.exists():
        for row in summarize(json.loads(report_path.read_text())):
            print(json.dumps(row))
    print(f"fleet prefix-cache hit rate: {hit_rate:.1%}")
    return code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guidellm", default="guidellm", help="the guidellm executable")
    p.add_argument("--scenario", default=str(DEFAULT_SCENARIO))
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--speedup", type=float, default=4.0)
    p.add_argument("--out", help="directory for the scenario and guidellm's JSON report")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
