"""Multi-turn chat through `kvroute proxy` on real vLLM pods: engine hits vs router predictions.

    python benchmarks/real_vllm_multiturn.py [--sessions 20] [--turns 5] [--fleet FILE]
        [--json OUT]

Method. Two real vLLM 0.32 CPU pods (the tiny random-weight Llama of `tests/real_vllm`,
block size 32, prefix caching, KV events to kvroute in bind mode) are started, or the ones a
`python -m tests.real_vllm.vllm_pods --describe FILE` process keeps up are used (`--fleet`).
For each policy — `precise` (prefix-cache-scorer on the KV-event index, weight 2, plus
queue-scorer) and `round-robin` (round-robin-picker) — a fresh `kvroute proxy` (in this
process, on 127.0.0.1) is put in front, the sessions get fresh random system prompts (so
nothing earlier is cached), and the turns are sent one request at a time: turn t of every
session, in a shuffled order (seeded), then turn t+1 (each turn re-sends the whole
conversation with the model's answer and a new user message, `max_tokens` 16; a system
prompt of ~720 tokens, user turns of ~90: the fifth turn is ~1,200 tokens, under the pods'
max_model_len 2048). Sequential requests make
the router's prediction exact to compare: before each request the precise index is asked how
many blocks each pod holds of its prompt; after it, the picked pod's figure × 32 tokens is
the predicted cached tokens.
The engines' figure is the delta of `vllm:prefix_cache_hits_total` /
`vllm:prefix_cache_queries_total` summed over the pods. Prints one line per policy: fleet hit
rate from the engines, predicted hit rate, requests, wall time. Timings are CPU timings of a
2-core machine shared with other work; the hit rates do not depend on them.

Why predicted and engine hits differ: vLLM recomputes the last prompt token even when every
block is cached (a fully cached prompt of 32k tokens counts 32k - 32 hits on 0.32, the last
block recomputed), and counts hits in tokens of the prompt it tokenized, while kvroute
predicts in whole 32-token blocks of its own tokenization; the events of the previous turn
can also arrive a moment after its response (no wait is inserted between turns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.config import parse_config
from router.proxy.app import ProxyApp, RunningServer
from router.request import parse_request
from tests.real_vllm.conftest import (
    EVENTS,
    PRECISE_PROFILE,
    SETTINGS,
    engine_counter,
    join_feeds,
    unique_text,
)
from tests.real_vllm.vllm_pods import (
    BLOCK_SIZE,
    MODEL_NAME,
    VllmFleet,
    adopt_fleet,
    make_fleet,
)

POLICIES = {
    "precise": PRECISE_PROFILE,
    "round-robin": """
plugins:
  - type: round-robin-picker
schedulingProfiles:
  - name: default
    plugins:
      - {pluginRef: round-robin-picker}
""",
}


async def fleet_counters(fleet: VllmFleet) -> tuple[float, float]:
    hits = queries = 0.0
    for pod in fleet.pods:
        hits += await engine_counter(pod, "prefix_cache_hits")
        queries += await engine_counter(pod, "prefix_cache_queries")
    return hits, queries


async def run_policy(fleet: VllmFleet, policy: str, sessions: int, turns: int) -> dict[str, Any]:
    text = fleet.router_config(POLICIES[policy] + "seed: 3\n", EVENTS)
    app = ProxyApp(parse_config(text, f"<{policy}>"), SETTINGS)
    convs = [
        [
            {"role": "system", "content": unique_text(100)},
            {"role": "user", "content": unique_text(12)},
        ]
        for _ in range(sessions)
    ]
    predicted = prompt_tokens = 0
    picks: dict[str, int] = {}
    async with (
        RunningServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=300) as c,
    ):
        await join_feeds(app, fleet)
        index = app.feeds.precise_index
        assert index is not None
        hits0, queries0 = await fleet_counters(fleet)
        t0 = time.monotonic()
        order = random.Random(7)
        for _turn in range(turns):
            # Sessions in a fresh order each turn: in a fixed order, an even number of
            # sessions would land on the same pod every turn under round-robin.
            for conv in order.sample(convs, len(convs)):
                body = {"model": MODEL_NAME, "messages": conv, "max_tokens": 16}
                req = parse_request(body, "/v1/chat/completions", chat_template=app.chat_template)
                held = index.longest_prefix(app.scheduler.keyer.keys(req))
                r = await c.post(
                    "/v1/chat/completions", json=body, headers={"x-kvroute-debug": "1"}
                )
                if r.status_code != 200:
                    raise SystemExit(f"{policy}: {r.status_code} {r.text}")
                pick = json.loads(r.headers["x-kvroute-decision"])["pick"]
                picks[pick] = picks.get(pick, 0) + 1
                out = r.json()
                prompt_tokens += out["usage"]["prompt_tokens"]
                predicted += int(held.get(pick, 0.0)) * BLOCK_SIZE
                conv.append(
                    {"role": "assistant", "content": out["choices"][0]["message"]["content"]}
                )
                conv.append({"role": "user", "content": unique_text(12)})
        wall = time.monotonic() - t0
        await asyncio.sleep(1.0)  # the last scrape of the counters
        hits1, queries1 = await fleet_counters(fleet)
    dq = queries1 - queries0
    return {
        "policy": policy,
        "requests": sessions * turns,
        "engine_hit_rate": (hits1 - hits0) / dq if dq else 0.0,
        "predicted_hit_rate": predicted / prompt_tokens if prompt_tokens else 0.0,
        "engine_queried_tokens": dq,
        "prompt_tokens": prompt_tokens,
        "picks": picks,
        "wall_s": round(wall, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--fleet", type=Path, help="JSON of pods kept up by vllm_pods --describe")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="kvroute-vllm-"))
    if args.fleet:
        fleet = adopt_fleet(args.fleet, log_dir)
    else:
        fleet = make_fleet(2, log_dir)
        fleet.start(900)
    try:
        results = []
        for policy in POLICIES:
            res = await run_policy(fleet, policy, args.sessions, args.turns)
            results.append(res)
            print(
                f"{policy:12s} engine hit rate {res['engine_hit_rate']:.3f}  "
                f"router predicted {res['predicted_hit_rate']:.3f}  "
                f"requests {res['requests']}  picks {res['picks']}  wall {res['wall_s']} s",
                flush=True,
            )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        fleet.stop()


if __name__ == "__main__":
    asyncio.run(main())
