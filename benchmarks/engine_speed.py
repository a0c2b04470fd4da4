"""Speed of the engine model alone: simulated requests per wall-second for a fleet of engines.

Method: 8 engines of the `llama-3.1-8b-h100` profile, driven by a minimal virtual-time loop
(no router: session i goes to pod i mod 8). Workload: multi-turn chat — 400 sessions, each turn
appends its answer (200 tokens) and a 150-token user message to the history, starting from a
1,600-token system+context prompt shared by the session (~2k-token prompts), Poisson arrivals
at `--rate` requests/s of virtual time. Each configuration runs `--repeats` times; the median
CPU time of the process is reported (the machine is shared, so wall time is noisier; on an idle
machine the two agree), for KV events off (the plain policies) and on (events built and handed
to a sink, as the prefix-precise policy needs), and with step fusion (`until` = next arrival)
and without (one call per engine step), with the ratio of the two.

    python benchmarks/engine_speed.py [--requests N] [--rate R] [--repeats K] [--json]
                                      [--profile-out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import json
import statistics
import time

import numpy as np

from router.blocks import token_block_keys
from router.sim.engine import Engine, EngineConfig, SimRequest
from router.sim.latency import LatencyModel, load_profile

PODS = 8


def make_requests(n: int, rate: float, seed: int = 0) -> list[tuple[float, int, SimRequest]]:
    rng = np.random.default_rng(seed)
    sessions = 400
    history = [rng.integers(0, 120_000, 1600, dtype=np.uint32) for _ in range(sessions)]
    out: list[tuple[float, int, SimRequest]] = []
    t = 0.0
    for i in range(n):
        t += rng.exponential(1.0 / rate)
        s = int(rng.integers(0, sessions))
        prompt = np.concatenate([history[s], rng.integers(0, 120_000, 150, dtype=np.uint32)])
        answer = rng.integers(0, 120_000, 200, dtype=np.uint32)
        if len(prompt) > 6000:  # start the session over
            prompt = prompt[-1750:]
        history[s] = np.concatenate([prompt, answer])
        keys = token_block_keys(prompt, 16)
        req = SimRequest(f"r{i}", prompt, 200, arrival=t, block_keys=keys, output_token_ids=answer)
        out.append((t, s % PODS, req))
    return out


def simulate(reqs: list[tuple[float, int, SimRequest]], events: bool, fuse: bool) -> int:
    profile = load_profile("llama-3.1-8b-h100")
    lm = LatencyModel(profile)
    sink_count = [0]

    def sink(evs: list, ts: float) -> None:
        sink_count[0] += len(evs)

    engines = [
        Engine(f"p{i}", EngineConfig.from_profile(profile), lm, sink if events else None)
        for i in range(PODS)
    ]
    for e in engines:
        e.cache.num_gpu_blocks  # noqa: B018 - warm attribute
    heap: list[tuple[float, int, int]] = []  # (time, kind 0=arrival 1=step, index)
    for i, (t, _, _) in enumerate(reqs):
        heap.append((t, 0, i))
    heapq.heapify(heap)
    busy = [False] * PODS
    done = 0
    next_arrival = [r[0] for r in reqs] + [float("inf")]
    arrived = 0
    while heap:
        t, kind, idx = heapq.heappop(heap)
        if kind == 0:
            _, pod, req = reqs[idx]
            arrived = idx + 1
            engines[pod].add_request(req, t)
            if not busy[pod]:
                busy[pod] = True
                heapq.heappush(heap, (t, 1, pod))
            continue
        eng = engines[idx]
        at = eng.next_step_at(t)
        if at is None:
            busy[idx] = False
            continue
        if at > t:
            heapq.heappush(heap, (at, 1, idx))
            continue
        out = eng.step(t, next_arrival[arrived] if fuse else None)
        done += len(out.finished)
        heapq.heappush(heap, (t + out.duration_s, 1, idx))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--rate", type=float, default=40.0, help="arrivals per virtual second")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile-out", help="write a cProfile of one run (events on, fused)")
    args = ap.parse_args(argv)
    reqs = make_requests(args.requests, args.rate)
    results: dict[str, float] = {}
    for events in (False, True):
        for fuse in (True, False):
            walls = []
            for _ in range(args.repeats):
                t0 = time.process_time()
                n = simulate(reqs, events, fuse)
                walls.append(time.process_time() - t0)
                assert n == len(reqs)
            name = f"events_{'on' if events else 'off'}_{'fused' if fuse else 'single'}"
            results[name] = len(reqs) / statistics.median(walls)
    if args.profile_out:
        cProfile.runctx(
            "simulate(reqs, True, True)", globals(), {"reqs": reqs}, filename=args.profile_out
        )
    ratio = results["events_off_fused"] / results["events_off_single"]
    if args.json:
        out = {k: round(v, 1) for k, v in results.items()}
        out["fused_vs_single"] = round(ratio, 2)
        print(json.dumps(out))
    else:
        for k, v in results.items():
            print(f"{k:<22} {v:>10.0f} simulated requests / CPU-second")
        print(f"fused vs single steps: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
