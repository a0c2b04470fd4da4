"""How close is a shadow policy's counterfactual to the real thing? Two runs on one workload.

    python benchmarks/shadow_counterfactual.py [--requests 200] [--pods 4] [--concurrency 8]
        [--speedup 4] [--seed 1] [--json OUT]

Method. The `multi-turn` workload of benchmarks/compare.py (3-8 turn sessions, each turn
resending the history, a 400-3000-token first message), replayed by the project's load
generator (`router/loadgen.py`, chat, streaming) in a closed loop at `--concurrency`, through
a `kvroute proxy` running in this process (its own event loop thread is this one: the figures
read here are token counts, not timings) in front of a fresh emulated fleet of `--pods` pods
(`router/emulator`, KV events bound, token blocks on the pods' tokenizer), twice:

- run A: the live policy is kvroute's default profile, with
  `shadow_policies: [round-robin, llm-d-default, sglang-cache-aware]`;
- run B: the live policy is round-robin (`round-robin-picker`), on a new fleet (cold caches)
  with the same workload and seed; `shadow_policies: [round-robin]` (the live policy itself,
  so the proxy's `kvroute_shadow_live_*` series carry the live figures and its agreement
  must be 100%).

Figures, per run, from the proxy's /metrics at the end: the live captured rate (prompt tokens
the chosen pod held as a cached prefix at decision time / prompt tokens, the live default
index: here the pods' KV events) — from `kvroute_prefix_tokens_captured_total /
kvroute_prompt_tokens_total` where the proxy exports them, else from the shadow set's
yardstick `kvroute_shadow_live_prefix_tokens_captured_total / kvroute_shadow_prompt_tokens_total`
(the JSON says which); per shadow policy its captured rate and its agreement with the live
pick (`kvroute_shadow_*`); and the fleet's hit rate from the pods' own counters (delta of
`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` over the run). The question
the table answers: run A's shadow estimate of round-robin's captured rate against run B's
actual round-robin captured rate.

Why they differ. A shadow scores the live fleet's state: in run A the caches were placed by
kvroute's picks, so a round-robin pick there often lands on a pod that a cache-aware policy
warmed; in run B nobody keeps a conversation on one pod, so fewer pods hold its history. The
shadow estimate answers "on this fleet, what would this pick have found", not "what would
this policy have built", and the gap measured here says how far the two are apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare import PodSample, scrape_pods, warm_pods

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet
from router.loadgen import LoadSettings, run_load
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings
from router.sim.workloads import LengthDistribution, Workload, make_workload

SHADOWS_A = ("round-robin", "llm-d-default", "sglang-cache-aware")
ROUND_ROBIN = """
plugins: [{type: round-robin-picker}]
schedulingProfiles: [{name: default, plugins: [{pluginRef: round-robin-picker}]}]
"""


def workload(requests: int, seed: int) -> Workload:
    """benchmarks/compare.py's multi-turn workload."""
    return make_workload(
        "multi-turn",
        num_requests=requests,
        seed=seed,
        first_user=LengthDistribution(1500, 0.4, 400, 3000),
        user=LengthDistribution(128, 0.6, 16, 1024),
        min_turns=3,
        max_turns=8,
    )


def _families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → labels → value."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _sum(fams: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float | None:
    series = fams.get(name)
    return None if series is None else sum(series.values())


def _by_policy(fams: dict, name: str) -> dict[str, float]:
    return {dict(labels)["policy"]: v for labels, v in (fams.get(name) or {}).items()}


def read_figures(text: str, deltas: list[PodSample]) -> dict[str, Any]:
    """The run's figures from the proxy's /metrics page and the pods' counter deltas."""
    fams = _families(text)
    prompt = _sum(fams, "kvroute_prompt_tokens_total")
    captured = _sum(fams, "kvroute_prefix_tokens_captured_total")
    shadow_prompt = _by_policy(fams, "kvroute_shadow_prompt_tokens_total")
    yard_prompt = next(iter(shadow_prompt.values()), None)
    yard = _sum(fams, "kvroute_shadow_live_prefix_tokens_captured_total")
    if prompt and captured is not None:
        live = {"captured_rate": captured / prompt, "source": "kvroute_prefix_tokens_*"}
    elif yard_prompt:
        live = {
            "captured_rate": (yard or 0.0) / yard_prompt,
            "source": "kvroute_shadow_live_prefix_tokens_captured_total",
        }
    else:
        live = {"captured_rate": None, "source": None}
    if yard_prompt:
        live["captured_rate_shadow_yardstick"] = (yard or 0.0) / yard_prompt
    # The decomposed hit rate: what some pod held, what the chosen pod held, what the engines
    # served from cache (all over the prompt tokens routed).
    for figure in ("available", "delivered"):
        total = _sum(fams, f"kvroute_prefix_tokens_{figure}_total")
        live[f"{figure}_rate"] = total / prompt if prompt and total is not None else None
    requests = _by_policy(fams, "kvroute_shadow_requests_total")
    agree = _by_policy(fams, "kvroute_shadow_pick_agreement_total")
    shadow_captured = _by_policy(fams, "kvroute_shadow_prefix_tokens_captured_total")
    shadows = {
        policy: {
            "requests": int(n),
            "captured_rate": shadow_captured.get(policy, 0.0) / shadow_prompt[policy]
            if shadow_prompt.get(policy)
            else None,
            "agreement": agree.get(policy, 0.0) / n if n else None,
        }
        for policy, n in requests.items()
    }
    hits = sum(d.hits for d in deltas)
    queries = sum(d.queries for d in deltas)
    return {
        "live": live,
        "shadows": shadows,
        "fleet_hit_rate": hits / queries if queries else None,
    }


async def run_once(
    name: str, policy_yaml: str, shadows: tuple[str, ...], args: argparse.Namespace
) -> dict[str, Any]:
    w = workload(args.requests, args.seed)
    async with (
        EmulatedFleet(
            pods=args.pods,
            events="bind",
            speedup=args.speedup,
            pod_args=["--seed", str(args.seed)],
            stderr=subprocess.DEVNULL,
        ) as fleet,
        httpx.AsyncClient(timeout=30.0) as client,
    ):
        text = (
            fleet.config_yaml()
            + "scrape: {interval_s: 0.5}\n"
            + policy_yaml
            + f"shadow_policies: [{', '.join(shadows)}]\n"
        )
        app = ProxyApp(parse_config(text, f"<{name}>"), ProxySettings(health_interval_s=0.5))
        await warm_pods(client, fleet)
        before = await scrape_pods(client, fleet)
        async with RunningServer(app) as server:
            settings = LoadSettings(
                base_url=server.url,
                model=fleet.pods[0].model,
                api="chat",
                concurrency=args.concurrency,
                timeout_s=120.0,
                max_tokens_cap=args.max_tokens,
            )
            report = await run_load(w, settings)
            await asyncio.sleep(0.3)  # the last responses' counters land
            page = (await client.get(f"{server.url}/metrics")).text
        after = await scrape_pods(client, fleet)
    deltas = [a.delta(b) for a, b in zip(after, before, strict=True)]
    out = read_figures(page, deltas)
    out["requests"] = len(report.results)
    out["failed"] = sum(not r.ok for r in report.results)
    out["wall_s"] = round(report.wall_s, 2)
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def format_table(a: dict[str, Any], b: dict[str, Any]) -> str:
    lines = [
        f"{'':40}{'captured':>10}{'agreement':>11}",
        f"{'run A live (kvroute default)':40}{_pct(a['live']['captured_rate']):>10}{'':>11}",
    ]
    for policy, s in a["shadows"].items():
        lines.append(
            f"{'run A shadow ' + policy:40}{_pct(s['captured_rate']):>10}{_pct(s['agreement']):>11}"
        )
    lines.append(f"{'run B live (round-robin)':40}{_pct(b['live']['captured_rate']):>10}")
    est = (a["shadows"].get("round-robin") or {}).get("captured_rate")
    real = b["live"]["captured_rate"]
    if est is not None and real is not None:
        lines.append(
            f"round-robin: shadow estimate {_pct(est)} vs actual {_pct(real)} "
            f"({(est - real) * 100:+.1f} points)"
        )
    for run, r in (("A", a), ("B", b)):
        lv = r["live"]
        lines.append(
            f"run {run} hit rate decomposed: available {_pct(lv.get('available_rate'))}, "
            f"captured {_pct(lv['captured_rate'])}, delivered {_pct(lv.get('delivered_rate'))}"
        )
    lines.append(
        f"fleet hit rate (pods' counters): run A {_pct(a['fleet_hit_rate'])}, "
        f"run B {_pct(b['fleet_hit_rate'])}"
    )
    lines.append(
        f"requests: A {a['requests']} ({a['failed']} failed), "
        f"B {b['requests']} ({b['failed']} failed); live captured read from {a['live']['source']}"
    )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    a = await run_once("run A", "", SHADOWS_A, args)
    b = await run_once("run B", ROUND_ROBIN, ("round-robin",), args)
    return {
        "settings": {
            "requests": args.requests,
            "pods": args.pods,
            "concurrency": args.concurrency,
            "speedup": args.speedup,
            "seed": args.seed,
        },
        "run_a": a,
        "run_b": b,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--speedup", type=float, default=4.0)
    ap.add_argument("--max-tokens", type=int, default=64, help="cap on each answer's tokens")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))
    print(format_table(result["run_a"], result["run_b"]))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
