"""`kvroute_shared_state_*` series, computed from a `RedisSync` when Prometheus scrapes (both
faces register the same collector, so the names and meanings are the same in each)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.shared_state.redis_sync import RedisSync


class SharedStateCollector(Collector):
    def __init__(self, sync: RedisSync) -> None:
        self._sync = sync

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        s = self._sync
        yield GaugeMetricFamily(
            "kvroute_shared_state_up", "1 while the shared-state store answers", value=int(s.up)
        )
        yield GaugeMetricFamily(
            "kvroute_shared_state_lag_seconds",
            "Delay of the newest change applied from another replica (its send to our apply)",
            value=s.lag_s,
        )
        yield CounterMetricFamily(
            "kvroute_shared_state_errors",
            "Failed shared-state store operations (the router routed on local state)",
            value=s.errors,
        )
        yield GaugeMetricFamily(
            "kvroute_shared_state_replicas",
            "Other replicas whose in-flight charges this replica holds",
            value=s.replicas,
        )
        yield CounterMetricFamily(
            "kvroute_shared_state_dropped_changes",
            "Own changes dropped unpublished (store down longer than the backlog holds)",
            value=s.state.dropped,
        )
