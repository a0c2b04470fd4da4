"""Do kvroute's re-implementations of the peers' policies route as the peers do? Live check.

    python benchmarks/validate_peers.py [--pairs sglang,vllm] [--share-tol 5] [--hit-tol 3]
        [compare.py's options: --workload NAME ... --pods N --requests N --concurrency C
         --speedup X --repeats N --json OUT ...]

Pairs: `sglang` = sglang-router 0.3.2 `--policy cache_aware` (its CLI defaults, passed
explicitly) against kvroute running `configs/policies/sglang-cache-aware.yaml`; `vllm` =
vllm-router 0.1.17 `--policy kv_aware` (fed by the pods' KV events) against kvroute running
`configs/policies/vllm-kv-aware.yaml` (the fleet's token blocks, so keys match the events).

Method: compare.py's `run_one` for each side: a fresh emulated fleet (same pods, seed, latency
profile, speedup), the router pinned to its own core, the same request stream from the load
generator. Each pod's share of the requests is the delta of its `vllm:request_success_total`
over the run; the fleet hit rate is the delta of the pods' prefix-cache counters. A pair
agrees when every pod's share differs by at most `--share-tol` points and the hit rate by at
most `--hit-tol` points. With `--repeats N` the sides alternate N times; shares are summed over
the repeats and the hit rate is the median, and each side's own spread over its repeats (the
largest range of a pod's share) is reported: the noise floor the tolerance has to clear.
Each side's validity (compare.py's lag check) is reported: the policies read in-flight
counts, so a run whose timing slipped may route apart for that reason alone.

Expect some disagreement that is not a bug: both policies break ties at random or by order
among equally loaded pods, and which pod a session's first turn lands on depends on which
requests are in flight at that instant, which the two sides' different per-request costs shift;
a session then stays where it began, so a few early differences move whole sessions.

A difference that is the policy's (measured 2026-12-01): vllm-router 0.1.17's `kv_aware` is
not the max-contiguous-blocks rule `vllm-kv-aware` implements. Its debug log gives each
decision as `outcome="prefix_cost"` with `new_prefill_tokens` and `credited_prefix_tokens`, and
its CLI has `--router-temperature` and `--kv-penalty-host/-external/-disk` tier credits: it
costs the uncached prefill per worker. On multi-turn (every session opens with the same
256-token system prompt) the blocks rule sends every request to the pod that first cached that
prompt (a match > 0 never falls back to load), while the binary spreads the sessions.
And sglang-router 0.3.2 sends a request that matches too little to the LAST of the equally
loaded workers in `--worker-urls` order (six unmatched chats one at a time, all loads 0, all
went to the fourth of four pods), where `sglang-cache-aware` with `tie_break: first` took the
first: over four 200-request multi-turn runs the first pod served 31% under kvroute, 22%
under sglang-router, the last pod 23% and 30%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare
from peers import ROUTERS, RouterError

#: name → (peer router, kvroute running its policy); names as in peers.ROUTERS.
PAIRS: dict[str, tuple[str, str]] = {
    "sglang": ("sglang-cache_aware", "kvroute-sglang-cache-aware"),
    "vllm": ("vllm-kv_aware", "kvroute-vllm-kv-aware"),
}


def shares(pod_requests: list[int]) -> list[float]:
    """Each pod's fraction of the requests (all 0 when there were none)."""
    total = sum(pod_requests)
    return [n / total if total else 0.0 for n in pod_requests]


def self_spread_pts(runs: list[list[int]]) -> float | None:
    """How far one router's repeats spread: the largest range of a pod's share (points) over
    the runs; None for a single run. The noise floor a per-pod tolerance must clear."""
    if len(runs) < 2:
        return None
    per_run = [shares(r) for r in runs]
    return round(max(max(col) - min(col) for col in zip(*per_run, strict=True)) * 100, 2)


def agreement(
    peer: dict[str, Any], ours: dict[str, Any], share_tol_pts: float, hit_tol_pts: float
) -> dict[str, Any]:
    """How far kvroute's run is from the peer's: per-pod share and hit rate, in points."""
    a, b = shares(peer["pod_requests"]), shares(ours["pod_requests"])
    if len(a) != len(b):
        raise ValueError(f"pod counts differ: {len(a)} vs {len(b)}")
    diffs = [round((y - x) * 100, 2) for x, y in zip(a, b, strict=True)]
    hit_diff = round((ours["hit_rate"] - peer["hit_rate"]) * 100, 2)
    share_ok = all(abs(d) <= share_tol_pts for d in diffs)
    hit_ok = abs(hit_diff) <= hit_tol_pts
    return {
        "peer_share_pct": [round(x * 100, 2) for x in a],
        "kvroute_share_pct": [round(y * 100, 2) for y in b],
        "share_diff_pts": diffs,
        "max_share_diff_pts": max((abs(d) for d in diffs), default=0.0),
        "peer_hit_rate": peer["hit_rate"],
        "kvroute_hit_rate": ours["hit_rate"],
        "hit_diff_pts": hit_diff,
        "share_ok": share_ok,
        "hit_ok": hit_ok,
        "agree": share_ok and hit_ok,
        "both_valid": bool(peer["valid"] and ours["valid"]),
    }


def format_pairs(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        verdict = "AGREE" if r["agree"] else "DIFFER"
        timing = "" if r["both_valid"] else " (a run is INVALID: lag over the bound)"
        lines += [
            f"\n{r['pair']} on {r['workload']}: {verdict}{timing}",
            f"  pod shares % {r['peer']:<28}{r['peer_share_pct']}",
            f"  pod shares % {r['kvroute']:<28}{r['kvroute_share_pct']}",
            f"  share diff (points)                        {r['share_diff_pts']} "
            f"(max {r['max_share_diff_pts']:.1f}, tolerance {r['share_tol_pts']:g})",
            f"  hit rate {r['peer_hit_rate']:.1%} vs {r['kvroute_hit_rate']:.1%}: "
            f"{r['hit_diff_pts']:+.1f} points (tolerance {r['hit_tol_pts']:g})",
            f"  lag p99 ms: peer {r['peer_lag_p99_ms']}, kvroute {r['kvroute_lag_p99_ms']}",
        ]
        if r["peer_spread_pts"] is not None:
            lines.append(
                f"  repeats' own spread of a pod's share (points): peer {r['peer_spread_pts']}, "
                f"kvroute {r['kvroute_spread_pts']}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"of {', '.join(PAIRS)}")
    p.add_argument("--share-tol", type=float, default=5.0, help="per-pod share, points")
    p.add_argument("--hit-tol", type=float, default=3.0, help="fleet hit rate, points")
    own, rest = p.parse_known_args(argv)
    unknown = [x for x in own.pairs.split(",") if x not in PAIRS]
    if unknown:
        p.error(f"unknown pair(s) {', '.join(unknown)}; known: {', '.join(PAIRS)}")
    if own.share_tol < 0 or own.hit_tol < 0:
        p.error("--share-tol and --hit-tol must be >= 0")
    args = compare.parse_args(rest)
    if not args.workload and not args.trace:
        args.workload = ["multi-turn"]
    return own, args


async def validate(own: argparse.Namespace, args: argparse.Namespace) -> dict[str, Any]:
    _, fleet_cpus = compare.pin_sides(args)
    skipped: dict[str, str] = {}
    pairs = []
    for name in own.pairs.split(","):
        why = next((w for r in PAIRS[name] if (w := ROUTERS[r].missing())), None)
        if why:
            skipped[name] = why
            compare.say(f"skipping {name}: {why}")
        else:
            pairs.append(name)
    names = [args.trace] if args.trace else list(args.workload)
    out_pairs: list[dict[str, Any]] = []
    all_rows: list[dict[str, Any]] = []
    for wl in names:
        workload, rate = compare.build_workload(wl, args)
        label = compare.workload_label(wl)
        for name in pairs:
            each: dict[str, list[compare.RunResult]] = {}
            try:
                for _ in range(args.repeats):
                    for router in PAIRS[name]:
                        t0 = time.monotonic()
                        compare.say(f"{label}: {router}: {len(workload.arrivals)} requests")
                        res = await compare.run_one(router, workload, rate, label, args)
                        each.setdefault(router, []).append(res)
                        all_rows.append(res.row)
                        compare.say(f"  {json.dumps(res.row)} ({time.monotonic() - t0:.0f}s)")
            except RouterError as e:
                skipped[f"{name}/{label}"] = str(e).splitlines()[0]
                compare.say(f"  {name} did not start: {e}")
                continue
            peer, ours = (compare.median_row(each[r]) for r in PAIRS[name])
            row = {
                "pair": name,
                "workload": label,
                "peer": PAIRS[name][0],
                "kvroute": PAIRS[name][1],
                "share_tol_pts": own.share_tol,
                "hit_tol_pts": own.hit_tol,
                **agreement(peer, ours, own.share_tol, own.hit_tol),
                "peer_lag_p99_ms": peer["lag_p99_ms"],
                "kvroute_lag_p99_ms": ours["lag_p99_ms"],
                "peer_spread_pts": self_spread_pts(
                    [x.row["pod_requests"] for x in each[PAIRS[name][0]]]
                ),
                "kvroute_spread_pts": self_spread_pts(
                    [x.row["pod_requests"] for x in each[PAIRS[name][1]]]
                ),
                "peer_failed": peer["failed"],
                "kvroute_failed": ours["failed"],
            }
            out_pairs.append(row)
    return {
        "pairs": out_pairs,
        "runs_each": all_rows,
        "skipped": skipped,
        "pinned": compare.format_cpus(fleet_cpus) if fleet_cpus else None,
        "settings": {
            **{
                k: v
                for k, v in vars(args).items()
                if k not in ("json_out", "router_cpu_set", "fleet_cpu_set")
            },
            "pairs": own.pairs,
            "share_tol": own.share_tol,
            "hit_tol": own.hit_tol,
        },
        "machine": compare.machine(),
        "versions": compare.versions(),
    }


def main(argv: list[str] | None = None) -> int:
    own, args = parse_args(argv)
    t0 = time.monotonic()
    result = asyncio.run(validate(own, args))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(format_pairs(result["pairs"]))
    for what, why in result["skipped"].items():
        print(f"skipped {what}: {why}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
