"""Closed-loop HTTP load and child-process helpers shared by the overhead benchmarks.

`closed_loop` keeps `concurrency` POSTs outstanding on aiohttp keep-alive connections and
records each latency; `Child` starts a helper process and waits for its "ready" line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np


@dataclass(slots=True)
class LoadResult:
    requests: int
    failed: int
    seconds: float
    latencies_s: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if len(self.latencies_s) else 0.0


async def closed_loop(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float | None = None,
    count: int | None = None,
    warmup: int = 50,
) -> LoadResult:
    """Keep `concurrency` requests in flight for `seconds` (or until `count` are done)."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> bool:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                return r.status == 200

        await asyncio.gather(*(one() for _ in range(min(warmup, concurrency * 4))))
        for _ in range(warmup):
            await one()
        lat: list[float] = []
        failed = 0
        done = 0
        start = time.perf_counter()
        stop_at = start + seconds if seconds else float("inf")
        limit = count if count else 1 << 62

        async def worker() -> None:
            nonlocal failed, done
            while done < limit and time.perf_counter() < stop_at:
                done += 1
                t0 = time.perf_counter()
                try:
                    ok = await one()
                except aiohttp.ClientError:
                    ok = False
                lat.append(time.perf_counter() - t0)
                failed += not ok

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return LoadResult(len(lat), failed, elapsed, np.array(lat))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A helper process started with `args`; `ready` is its first stdout line's words."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"{args[:3]} did not start: {line!r}")
        self.ready = line.split()[1:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
