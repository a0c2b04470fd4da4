"""Simulator speed: simulated requests per wall-clock second for the default `kvroute simulate`.

Method: build the default run's workloads (8 pods of Llama-3.1-8B on H100; multi-turn chat
and shared-prompt, 1,000 requests each) once, then time `run_policies` over all seven policies,
three times; report the median. `sim_requests_per_s` = simulated requests (workload requests ×
policies) / wall seconds of the policy runs. Workload generation is timed separately
(`workload_build_s`) since it happens once per invocation whatever the number of policies.
Target: ≥ 2,000 simulated requests/s for 8 pods.

    python benchmarks/sim_speed.py [--json] [--runs 3] [--requests 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router.sim.cli import (
    DEFAULT_LOAD,
    DEFAULT_PODS,
    DEFAULT_PROFILE,
    DEFAULT_WORKLOADS,
)
from router.sim.fleet import parse_fleet
from router.sim.policies import POLICIES
from router.sim.runner import SimSettings, run_policies
from router.sim.workloads import make_workload


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000, help="requests per workload")
    args = ap.parse_args()

    fleet = parse_fleet(str(DEFAULT_PODS))
    t0 = time.perf_counter()
    workloads = [
        make_workload(
            name,
            num_requests=args.requests,
            seed=0,
            rate_per_s=DEFAULT_LOAD[name].rate_per_pod * DEFAULT_PODS,
        )
        for name in DEFAULT_WORKLOADS
    ]
    build_s = time.perf_counter() - t0
    simulated = sum(len(w.arrivals) for w in workloads) * len(POLICIES)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        for w in workloads:
            run_policies(w, fleet, POLICIES, DEFAULT_PROFILE, SimSettings())
        times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    result = {
        "sim_requests_per_s": round(simulated / wall, 1),
        "simulated_requests": simulated,
        "wall_s_median": round(wall, 3),
        "wall_s_runs": [round(t, 3) for t in times],
        "workload_build_s": round(build_s, 3),
        "pods": DEFAULT_PODS,
        "policies": len(POLICIES),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['sim_requests_per_s']:,.0f} simulated requests/s "
            f"({simulated} requests, median wall {wall:.2f} s of {args.runs} runs; "
            f"workload build {build_s:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
