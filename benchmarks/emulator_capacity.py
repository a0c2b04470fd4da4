"""How many emulated pods one machine can run before their timing error exceeds 10%.

Method: for N = 1, 2, 3, ... start N emulated Llama-3.1-8B/H100 pods (separate processes) at
`--speedup` (default 10) and keep `--streams` (default 32) streaming requests in flight on
every pod for `--seconds` of wall time (closed loop: each of the 32 clients sends its next
request when the previous one ends; 128-token prompts, `--tokens` output tokens; raw HTTP/1.1
clients in this process). Every request carries an `x-request-id`, so each one is compared
with the engine model's own times for that very request (same arrival, same batch-mates), read
from the pod's `/admin/timings`:

- TTFT and end-to-end latency in the pod (hand-off to the engine → first / last token handed
  to the HTTP writer, × speedup) against the model's TTFT and e2e: the wall-clock driver's lag;
- the mean inter-token latency the client saw (× speedup) against the model's time per output
  token: what a router measuring a stream would see.

Requests that start in the first second are warm-up and not counted. The error of a pod is
the relative error of the mean of each figure over its requests; the run's timing error is
the worst over pods and figures. The capacity is the largest N within `--tolerance`; a second
capacity counts only ITL and e2e (the loop runs until those exceed the tolerance), since at
high speed-ups a TTFT of one or two wall milliseconds is within the event loop's timer slack
(about half a millisecond, i.e. 5 ms emulated at speed-up 10). Also
reported: the client-side TTFT error (from sending the request), where the load generator's
own time to open connections and send bodies counts `speedup` times over. The load generator
shares the machine with the pods; the CPU count and the load average at the start are
printed with the result, since other work on the machine moves the figure.

    python benchmarks/emulator_capacity.py [--speedup 10] [--streams 32] [--max-pods 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import httpx

from router.emulator.fleet import EmulatedFleet, FleetPod
from router.emulator.loadgen import StreamTiming, stream_completion

WARMUP_S = 1.0


def _prompt(seed: int, n: int = 128) -> list[int]:
    return [(seed * 7919 + i * 104_729) % 120_000 + 1000 for i in range(n)]


@dataclass(frozen=True, slots=True)
class PodErrors:
    server_ttft: float
    server_e2e: float
    client_itl: float
    client_ttft: float
    requests: int
    #: Means in emulated milliseconds: the model's TTFT, the pod's, the client's.
    ttft_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def timing(self) -> float:
        return max(self.server_ttft, self.server_e2e, self.client_itl)

    @property
    def streaming(self) -> float:
        """The error without TTFT (inter-token latency and end-to-end latency only)."""
        return max(self.server_e2e, self.client_itl)


def _rel(measured: float, model: float) -> float:
    return abs(measured - model) / model


async def load_pod(pod: FleetPod, args: argparse.Namespace, index: int) -> PodErrors:
    host, port = pod.endpoint.rsplit(":", 1)
    start = time.perf_counter()
    deadline = start + args.seconds
    done: dict[str, StreamTiming] = {}

    async def client(c: int) -> None:
        k = 0
        while time.perf_counter() < deadline:
            k += 1
            rid = f"p{index}c{c}r{k}"
            body = {
                "model": pod.model,
                "prompt": _prompt(index * 1_000_000 + c * 10_000 + k),
                "max_tokens": args.tokens,
                "ignore_eos": True,
            }
            sent = time.perf_counter()
            r = await stream_completion(host, int(port), body, request_id=rid)
            if r.status != 200 or not r.done:
                raise RuntimeError(f"pod {pod.endpoint}: request {rid} failed: {r.error}")
            if sent - start >= WARMUP_S:
                done[rid] = r

    await asyncio.gather(*(client(c) for c in range(args.streams)))
    async with httpx.AsyncClient() as http:
        recs = (await http.get(f"{pod.url}/admin/timings")).json()
    by_id = {r["request_id"].rsplit("-", 1)[0]: r for r in recs}
    pairs = [(done[rid], by_id[rid]) for rid in done if rid in by_id]
    if not pairs:
        raise RuntimeError(f"pod {pod.endpoint}: no request finished after the warm-up")
    sp = args.speedup

    def mean(values: object) -> float:
        return statistics.mean(values)  # type: ignore[arg-type]

    model_ttft = mean(r["model_ttft_s"] for _, r in pairs)
    server_ttft = mean((r["first_token_wall"] - r["arrival_wall"]) * sp for _, r in pairs)
    client_ttft = mean(t.ttft * sp for t, _ in pairs)
    model_e2e = mean(r["model_e2e_s"] for _, r in pairs)
    model_tpot = mean(
        (r["model_e2e_s"] - r["model_ttft_s"]) / (r["output_tokens"] - 1) for _, r in pairs
    )
    return PodErrors(
        server_ttft=_rel(server_ttft, model_ttft),
        server_e2e=_rel(
            mean((r["finished_wall"] - r["arrival_wall"]) * sp for _, r in pairs), model_e2e
        ),
        client_itl=_rel(mean(t.mean_itl * sp for t, _ in pairs), model_tpot),
        client_ttft=_rel(client_ttft, model_ttft),
        requests=len(pairs),
        ttft_ms=(model_ttft * 1e3, server_ttft * 1e3, client_ttft * 1e3),
    )


async def measure(n: int, args: argparse.Namespace) -> list[PodErrors]:
    async with EmulatedFleet(n, speedup=args.speedup, events="none", profile=args.profile) as f:
        return list(await asyncio.gather(*(load_pod(p, args, i) for i, p in enumerate(f.pods))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--speedup", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seconds", type=float, default=6.0, help="wall seconds of load per run")
    p.add_argument("--profile", default="llama-3.1-8b-h100")
    p.add_argument("--max-pods", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    load = os.getloadavg()[0]
    rows = []
    capacity = 0
    streaming_capacity = 0
    for n in range(1, args.max_pods + 1):
        pods = asyncio.run(measure(n, args))
        worst = max(pods, key=lambda e: e.timing)
        row = {
            "pods": n,
            "timing_error_pct": round(worst.timing * 100, 2),
            "itl_e2e_error_pct": round(max(e.streaming for e in pods) * 100, 2),
            "server_ttft_error_pct": round(max(e.server_ttft for e in pods) * 100, 2),
            "server_e2e_error_pct": round(max(e.server_e2e for e in pods) * 100, 2),
            "client_itl_error_pct": round(max(e.client_itl for e in pods) * 100, 2),
            "client_ttft_error_pct": round(max(e.client_ttft for e in pods) * 100, 2),
            "requests": sum(e.requests for e in pods),
            "ttft_ms_model_server_client": [round(v, 1) for v in worst.ttft_ms],
        }
        rows.append(row)
        if not args.json:
            print(
                f"  {n} pod(s): timing error {row['timing_error_pct']:6.2f}% (server TTFT "
                f"{row['server_ttft_error_pct']:.2f}%, server e2e "
                f"{row['server_e2e_error_pct']:.2f}%, client ITL "
                f"{row['client_itl_error_pct']:.2f}%); client TTFT "
                f"{row['client_ttft_error_pct']:.1f}%; {row['requests']} requests; TTFT ms "
                f"model/server/client {row['ttft_ms_model_server_client']}",
                flush=True,
            )
        if worst.timing <= args.tolerance and capacity == n - 1:
            capacity = n
        if max(e.streaming for e in pods) > args.tolerance:
            break
        streaming_capacity = n
    result = {
        "cpus": os.cpu_count(),
        "load_average_at_start": round(load, 2),
        "speedup": args.speedup,
        "streams_per_pod": args.streams,
        "tolerance_pct": args.tolerance * 100,
        "capacity_pods": capacity,
        "capacity_pods_itl_e2e": streaming_capacity,
        "runs": rows,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"capacity: {capacity} pod(s) at speedup {args.speedup} with {args.streams} streams "
            f"each on {os.cpu_count()} CPUs (every figure within {args.tolerance:.0%}); "
            f"{streaming_capacity} counting ITL and e2e only (load average at start {load:.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
