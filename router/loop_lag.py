"""How late an asyncio event loop runs what it is given: the probe, and its Prometheus series.

A stalled loop (a GC pause, a synchronous parse, a long tokenization) delays every request it
holds, which is where a proxy's tail latency comes from. `LoopLagProbe` measures it from
outside: a thread posts a callback every `interval_s` and records how late the loop ran it
against the probe's own schedule (a thread woken late, or kept from the GIL by the busy loop,
counts against the loop too). The load generator keeps the raw samples; a long-running face
keeps cumulative histogram buckets instead (`LoopLagCollector`), so memory stays bounded and
Prometheus (or a benchmark diffing two scrapes) reads `kvroute_event_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

#: Upper bounds of the lag buckets, in seconds (sub-millisecond to a second).
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class LagHistogram:
    """Cumulative lag counts per bucket of `LAG_BUCKETS` (plus +Inf), count and sum."""

    def __init__(self, bounds: tuple[float, ...] = LAG_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, lag_s: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, lag_s)] += 1
        self.total += lag_s


class LoopLagProbe:
    """Samples how late an asyncio loop runs a callback posted from another thread.

    Every `interval_s` the probe thread posts a callback; its lag is the time it ran minus the
    time it was meant to be posted. `on_sample` (called on the loop) receives each lag;
    without one the samples are kept and `stop()` returns them.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval_s: float = 0.005,
        on_sample: Callable[[float], None] | None = None,
    ) -> None:
        self._loop = loop
        self._interval = interval_s
        self._stop = threading.Event()
        self.samples: list[float] = []
        self._on_sample = on_sample if on_sample is not None else self.samples.append
        self._thread = threading.Thread(target=self._run, name="loop-lag-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.perf_counter() + self._interval
        while not self._stop.is_set():
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                self._loop.call_soon_threadsafe(self._ran, due)
            except RuntimeError:  # the loop closed
                return
            # The next probe on schedule; one that would already be late skips ahead.
            due = max(due + self._interval, time.perf_counter())

    def _ran(self, due: float) -> None:
        self._on_sample(time.perf_counter() - due)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=1.0)
        return list(self.samples)


class LoopLagCollector(Collector):
    """`kvroute_event_loop_lag_seconds{face}`: a histogram of a face's loop lag, probed every
    `interval_s` (20 ms: ~50 wake-ups a second, invisible in the face's CPU)."""

    def __init__(self, face: str, interval_s: float = 0.02) -> None:
        self.face = face
        self.interval_s = interval_s
        self.histogram = LagHistogram()
        self._probe: LoopLagProbe | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._probe is None:
            self._probe = LoopLagProbe(loop, self.interval_s, on_sample=self.histogram.add)

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.stop()
            self._probe = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        h = self.histogram
        family = HistogramMetricFamily(
            "kvroute_event_loop_lag_seconds",
            "How late the face's event loop ran a callback posted on schedule (loop stalls)",
            labels=["face"],
        )
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        family.add_metric([self.face], buckets, h.total)
        yield family
