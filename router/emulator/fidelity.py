"""Timing fidelity: a running emulated pod measured from outside vs the engine model's own
prediction for the same inputs (same profile, so this checks the wall-clock driver).

Cases (Llama-3.1-8B/H100 by default): TTFT of a 2,000-token prompt with 0% and 90% of it
cached, and the mean inter-token latency of 1 and of N concurrent sequences. Each case sends
its requests to the pod with `loadgen.stream_completion` (client-side times, so HTTP and
tokenization overhead count against the emulator), reads the pod's own record of the same
requests (`/admin/timings`: engine hand-off to token delivery, the driver alone), and replays
the same requests, at the arrival times the pod recorded, through a virtual-time `Engine` for
the prediction (the 64 requests of a case reach the pod over a few milliseconds, which changes
their batching; replaying the real arrivals keeps "same inputs" exact). Measured times are
wall seconds × speedup.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from typing import Any

import httpx

from router.emulator.loadgen import StreamTiming, stream_completion
from router.sim.engine import Engine, EngineConfig, FinishedRequest, SimRequest
from router.sim.latency import LatencyModel, load_profile


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    #: Client side: from sending the request to reading the chunk (HTTP and parsing included).
    measured_s: float
    #: The engine model in virtual time, fed the same requests at the same arrival times.
    predicted_s: float
    #: Server side: the pod's own record (request handed to the engine → token handed to the
    #: HTTP writer): the wall-clock driver without HTTP and JSON overhead.
    server_s: float

    @property
    def error(self) -> float:
        return abs(self.measured_s - self.predicted_s) / self.predicted_s

    @property
    def server_error(self) -> float:
        return abs(self.server_s - self.predicted_s) / self.predicted_s


class VirtualPod:
    """The engine model in virtual time, fed the same request groups as the real pod."""

    def __init__(self, profile: str, num_gpu_blocks: int | None = None) -> None:
        p = load_profile(profile)
        cfg = (
            EngineConfig.from_profile(p, num_gpu_blocks=num_gpu_blocks)
            if num_gpu_blocks
            else EngineConfig.from_profile(p)
        )
        self.engine = Engine("virtual", cfg, LatencyModel(p))
        self.now = 0.0
        self._n = 0

    def run(
        self, prompts: list[list[int]], max_tokens: int, arrivals: list[float] | None = None
    ) -> list[FinishedRequest]:
        """Submit `prompts` at the current time plus their `arrivals` offsets (default: all
        at once); a request joins the first step that starts at or after its arrival. Runs
        until all finish, then leaves an idle second before the next group."""
        offsets = arrivals or [0.0] * len(prompts)
        order = sorted(range(len(prompts)), key=offsets.__getitem__)
        pending = [(self.now + offsets[i], i) for i in order]
        ids = [""] * len(prompts)
        done: dict[str, FinishedRequest] = {}
        k = 0
        while len(done) < len(prompts):
            while k < len(pending) and pending[k][0] <= self.now:
                at, i = pending[k]
                self._n += 1
                ids[i] = f"v{self._n}"
                req = SimRequest(ids[i], prompts[i], max_tokens, arrival=at)
                self.engine.add_request(req, self.now)
                k += 1
            if self.engine.next_step_at(self.now) is None:
                self.now = pending[k][0]  # idle until the next arrival
                continue
            out = self.engine.step(self.now)
            self.now += out.duration_s
            for fin in out.finished:
                done[fin.request_id] = fin
        self.now += 1.0
        return [done[r] for r in ids]


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104_729) % 120_000 + 1000 for i in range(n)]


async def measure(
    host: str,
    port: int,
    model: str,
    *,
    speedup: float,
    profile: str = "llama-3.1-8b-h100",
    concurrency: int = 64,
    repeats: int = 3,
    decode_tokens: int = 48,
    num_gpu_blocks: int | None = None,
) -> list[CaseResult]:
    """Run every case `repeats` times against the pod at host:port; medians per case."""
    virtual = VirtualPod(profile, num_gpu_blocks)
    timings_url = f"http://{host}:{port}/admin/timings"
    counter = 0

    async def run_case(
        prompts: list[list[int]], max_tokens: int
    ) -> tuple[list[StreamTiming], list[dict[str, Any]], list[FinishedRequest]]:
        """Send the prompts together; return the client timings, the pod's records and the
        virtual engine's run with the arrival times the pod recorded."""
        nonlocal counter
        ids = []
        for _ in prompts:
            counter += 1
            ids.append(f"fidelity-{counter}")
        bodies = [
            {"model": model, "prompt": p, "max_tokens": max_tokens, "ignore_eos": True}
            for p in prompts
        ]
        out = await asyncio.gather(
            *(
                stream_completion(host, port, b, request_id=i)
                for b, i in zip(bodies, ids, strict=True)
            )
        )
        for r in out:
            if r.status != 200 or not r.done:
                raise RuntimeError(f"request failed: {r.status} {r.error}")
        async with httpx.AsyncClient() as c:
            recs = {r["request_id"].rsplit("-", 1)[0]: r for r in (await c.get(timings_url)).json()}
        mine = [recs[i] for i in ids]
        first = min(r["arrival_wall"] for r in mine)
        arrivals = [(r["arrival_wall"] - first) * speedup for r in mine]
        return list(out), mine, virtual.run(prompts, max_tokens, arrivals)

    def ttft(
        client: list[StreamTiming], recs: list[dict[str, Any]], model: list[FinishedRequest]
    ) -> tuple[float, float, float]:
        return (
            statistics.mean(t.ttft for t in client) * speedup,
            statistics.mean(f.ttft for f in model),
            statistics.mean(r["first_token_wall"] - r["arrival_wall"] for r in recs) * speedup,
        )

    def itl(
        client: list[StreamTiming], recs: list[dict[str, Any]], model: list[FinishedRequest]
    ) -> tuple[float, float, float]:
        return (
            statistics.mean(t.mean_itl for t in client) * speedup,
            statistics.mean(f.tpot for f in model),
            statistics.mean(
                (r["finished_wall"] - r["first_token_wall"]) / max(1, r["output_tokens"] - 1)
                for r in recs
            )
            * speedup,
        )

    await run_case([_prompt(999_999, 64)], 4)  # warm up the server's code paths
    samples: dict[str, list[tuple[float, float, float]]] = {}
    for rep in range(repeats):
        base = 1000 * (rep + 1)
        cold = _prompt(base, 2000)
        samples.setdefault("ttft_2000_cached_0pct", []).append(ttft(*await run_case([cold], 2)))
        warm = cold[:1800] + _prompt(base + 1, 200)
        samples.setdefault("ttft_2000_cached_90pct", []).append(ttft(*await run_case([warm], 2)))
        one = [_prompt(base + 2, 128)]
        samples.setdefault("itl_1_seq", []).append(itl(*await run_case(one, decode_tokens)))
        many = [_prompt(base + 10 + j, 128) for j in range(concurrency)]
        samples.setdefault(f"itl_{concurrency}_seqs", []).append(
            itl(*await run_case(many, decode_tokens))
        )
    return [
        CaseResult(
            name,
            statistics.median(m for m, _, _ in triples),
            statistics.median(p for _, p, _ in triples),
            statistics.median(s for _, _, s in triples),
        )
        for name, triples in samples.items()
    ]
