"""The event-loop lag probe and its Prometheus histogram."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.loop_lag import LAG_BUCKETS, LagHistogram, LoopLagCollector


def test_histogram_counts_each_sample_in_its_bucket() -> None:
    h = LagHistogram()
    for lag in (0.0001, 0.0005, 0.003, 2.0):
        h.add(lag)
    # 0.0005 sits on a bound: `le` is inclusive, as in Prometheus.
    assert h.counts[0] == 2
    assert h.counts[LAG_BUCKETS.index(0.005)] == 1
    assert h.counts[-1] == 1
    assert h.total == pytest.approx(2.0036)


def _buckets(registry: CollectorRegistry) -> dict[float, float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name == "kvroute_event_loop_lag_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    assert s.labels["face"] == "proxy"
                    out[float(s.labels["le"])] = s.value
    return out


async def test_a_stalled_loop_shows_in_the_exported_histogram() -> None:
    collector = LoopLagCollector("proxy", interval_s=0.01)
    registry = CollectorRegistry()
    registry.register(collector)
    collector.start(asyncio.get_running_loop())
    try:
        await asyncio.sleep(0.1)  # some on-time samples
        time.sleep(0.3)  # the loop stalls: the probe's callbacks wait behind it
        await asyncio.sleep(0.05)
    finally:
        collector.stop()
    buckets = _buckets(registry)
    assert sorted(buckets) == [*LAG_BUCKETS, float("inf")]
    counts = [buckets[b] for b in sorted(buckets)]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] >= 3
    assert counts[-1] - buckets[0.1] >= 1  # the stall: at least one sample later than 100 ms
