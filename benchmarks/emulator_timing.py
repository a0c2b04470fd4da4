"""Timing fidelity of the emulator: measured vs the engine model, strict 10% check.

Method: start one emulated Llama-3.1-8B/H100 pod as a separate process (`--speedup`, default
1), then for each case send the requests from this process over raw HTTP/1.1 streams and take
client-side times × speedup; replay the same requests through a virtual-time `Engine` for the
prediction, with the arrival times the pod recorded. The pod's own records (`/admin/timings`,
engine hand-off to token delivery) give the server-side figure, which leaves out HTTP and
JSON overhead. Cases: TTFT of a 2,000-token prompt with 0% and 90% cached prefix, mean
inter-token latency at 1 and at 64 concurrent sequences. Each case is repeated `--repeats`
times and the median is reported. Exit status 1 when any case's client-side figure errs by more
than `--tolerance`.

    python benchmarks/emulator_timing.py [--speedup 1] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from router.emulator.fidelity import measure
from router.emulator.fleet import EmulatedFleet


async def run(args: argparse.Namespace) -> list[dict]:
    async with EmulatedFleet(1, speedup=args.speedup, events="none", profile=args.profile) as f:
        pod = f.pods[0]
        host, port = pod.endpoint.rsplit(":", 1)
        results = await measure(
            host,
            int(port),
            pod.model,
            speedup=args.speedup,
            profile=args.profile,
            repeats=args.repeats,
            concurrency=args.concurrency,
        )
    return [
        {
            "case": r.name,
            "measured_ms": round(r.measured_s * 1e3, 3),
            "server_ms": round(r.server_s * 1e3, 3),
            "model_ms": round(r.predicted_s * 1e3, 3),
            "error_pct": round(r.error * 100, 2),
            "server_error_pct": round(r.server_error * 100, 2),
            "ok": r.error <= args.tolerance,
        }
        for r in results
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--profile", default="llama-3.1-8b-h100")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = asyncio.run(run(args))
    if args.json:
        print(json.dumps({"speedup": args.speedup, "profile": args.profile, "cases": rows}))
    else:
        print(
            f"emulator timing fidelity, {args.profile}, speedup {args.speedup}, "
            f"median of {args.repeats}"
        )
        for r in rows:
            flag = "ok" if r["ok"] else "FAIL"
            print(
                f"  {r['case']:24s} client {r['measured_ms']:8.3f} ms ({r['error_pct']:6.2f}%)  "
                f"server {r['server_ms']:8.3f} ms ({r['server_error_pct']:6.2f}%)  "
                f"model {r['model_ms']:8.3f} ms  {flag}"
            )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
