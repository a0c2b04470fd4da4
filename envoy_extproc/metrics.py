"""The picker's own Prometheus metrics (`kvroute_` prefix), served on the metrics port.

Per-request series are updated by the stream state machine; pool-level series (pods known and
ready, average KV utilization and queue, KV-event and scrape counters) are computed when
Prometheus scrapes, from the live registry and feed stats, so the request path pays nothing
for them.

Mapping to the Gateway API Inference Extension (GAIE) metric names users know, kvroute → GAIE:
- kvroute_requests_total{model,profile,result} → inference_objective_request_total
- kvroute_request_errors_total{model,kind} → inference_objective_request_error_total
- kvroute_request_duration_seconds{model} → inference_objective_request_duration_seconds
- kvroute_time_to_first_token_seconds{model} → (none in GAIE; llm-d's TTFT)
- kvroute_normalized_time_per_output_token_seconds{model}
  → inference_objective_normalized_time_per_output_token_seconds
- kvroute_input_tokens{model} → inference_objective_input_tokens
- kvroute_output_tokens{model} → inference_objective_output_tokens
- kvroute_running_requests{model} → inference_objective_running_requests
- kvroute_pool_average_kv_cache_utilization → inference_pool_average_kv_cache_utilization
- kvroute_pool_average_queue_size → inference_pool_average_queue_size
- kvroute_pool_ready_pods → inference_pool_ready_pods
- kvroute_scheduler_e2e_duration_seconds → inference_extension_scheduler_e2e_duration_seconds
- kvroute_prefix_hit_ratio → (llm-d prefix-cache scorer hit ratio)
- kvroute_decisions_total{profile,result}: result "single", "pd" (remote prefill) or an error
  code; kvroute_pool_pods, kvroute_pod_inflight_requests{pod},
  kvroute_extproc_streams_active, kvroute_kv_events_*_total, kvroute_scrapes_*_total,
  kvroute_discovery_*_total: ours, no GAIE equivalent.

- kvroute_scheduler_plugin_duration_seconds{profile,plugin,kind}
  → inference_extension_plugin_duration_seconds (timed by wrapping each profile's
  filters, scorers and picker in `time_plugins`; the scheduler itself keeps no timings).

GAIE's families themselves are exported too, with the same values (`gaie_metrics.py`): the
per-request families below are `Paired` stand-ins that update both, and bound the model
label (a model no pod serves, and not declared, is `other` in both).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from envoy_extproc.gaie_metrics import Bounded, GaieMetrics, GaiePoolCollector, ModelLabels
from router.pods import PodRegistry
from router.tokenize_worker import TOKENIZE_BUCKETS

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (1, 16, 64, 256, 1024, 4096, 8192, 16384, 32768, 131072)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class PickerMetrics:
    """All series of one picker, in their own `CollectorRegistry`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        pool_name: str = "kvroute",
        models: Collection[str] = (),
    ) -> None:
        """`pool_name`: GAIE's pool `name` label; `models`: model names allowed as label
        values besides those the pods serve."""
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvroute_requests", "Requests routed", ["model", "profile", "result"], registry=r
        )
        self.errors = Counter(
            "kvroute_request_errors", "Requests refused or failed", ["model", "kind"], registry=r
        )
        self.decisions = Counter(
            "kvroute_decisions", "Scheduling decisions", ["profile", "result"], registry=r
        )
        self.stripped_fields = Counter(
            "kvroute_stripped_fields",
            "Router-only body fields a client sent, removed before the pod, by field",
            ["field"],
            registry=r,
        )
        self.request_duration = Histogram(
            "kvroute_request_duration_seconds",
            "Request headers to response end",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kvroute_time_to_first_token_seconds",
            "Routing decision to first response body chunk",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ntpot = Histogram(
            "kvroute_normalized_time_per_output_token_seconds",
            "Request duration divided by output tokens",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "kvroute_input_tokens", "Prompt tokens", ["model"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.output_tokens = Histogram(
            "kvroute_output_tokens",
            "Completion tokens",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "kvroute_running_requests", "Requests routed and not finished", ["model"], registry=r
        )
        self.scheduling = Histogram(
            "kvroute_scheduler_e2e_duration_seconds",
            "Time spent in Scheduler.schedule",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefix_hit = Histogram(
            "kvroute_prefix_hit_ratio",
            "Fraction of the prompt's blocks the chosen pod holds",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.plugin_duration = Histogram(
            "kvroute_scheduler_plugin_duration_seconds",
            "Time spent in one filter, scorer or picker of a profile",
            ["profile", "plugin", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_duration = Histogram(
            "kvroute_tokenize_duration_seconds",
            "Time spent tokenizing and keying a prompt (not in the scheduling time)",
            buckets=TOKENIZE_BUCKETS,
            registry=r,
        )
        self.streams = Gauge("kvroute_extproc_streams_active", "Open ext_proc streams", registry=r)
        self.request_sizes = Histogram(
            "kvroute_request_sizes_bytes",
            "Request body bytes routed",
            ["model"],
            buckets=tuple(float(4**i) for i in range(3, 16)),
            registry=r,
        )
        self.response_sizes = Histogram(
            "kvroute_response_sizes_bytes",
            "Response body bytes (only where response bodies pass through the picker)",
            ["model"],
            buckets=tuple(float(4**i) for i in range(3, 16)),
            registry=r,
        )
        self.model_labels = ModelLabels(models)
        self.gaie = GaieMetrics(r, pool_name)
        for name, paired in self.gaie.pair(self, self.model_labels).items():
            setattr(self, name, paired)
        self.ttft = Bounded(self.ttft, self.model_labels)  # no GAIE twin, same bound

    def watch_pool(
        self, pods: PodRegistry, feed_stats: Callable[[], dict[str, dict[str, Any]]]
    ) -> None:
        """Export pool gauges and the feeds' counters (computed at scrape time); bound model
        labels by what `pods` serve."""
        self.model_labels.follow(pods)
        self.registry.register(_PoolCollector(pods, feed_stats))
        self.registry.register(GaiePoolCollector(pods, self.gaie.pool_name))

    def watch_shared_state(self, sync: Any) -> None:
        """Export `kvroute_shared_state_*` (up, lag, errors) of a `RedisSync`."""
        from router.shared_state.metrics import SharedStateCollector

        self.registry.register(SharedStateCollector(sync))


def time_plugins(scheduler: Any, metrics: PickerMetrics) -> None:
    """Wrap every filter, scorer and picker of the scheduler's profiles so each call is timed
    into `kvroute_scheduler_plugin_duration_seconds` (about 1 µs a call)."""
    for name, profile in scheduler.profiles.items():
        profile.filters = [
            _Timed(f, "filter", metrics.plugin_duration.labels(name, _name(f), "filter"))
            for f in profile.filters
        ]
        profile.scorers = [
            (
                _Timed(
                    s, _score_method(s), metrics.plugin_duration.labels(name, _name(s), "scorer")
                ),
                w,
            )
            for s, w in profile.scorers
        ]
        p = profile.picker
        profile.picker = _Timed(p, "pick", metrics.plugin_duration.labels(name, _name(p), "picker"))


def _score_method(scorer: Any) -> str:
    """The method the scheduler calls: `score_details` where a scorer explains its scores."""
    return "score_details" if hasattr(scorer, "score_details") else "score"


def _name(plugin: Any) -> str:
    return str(getattr(plugin, "name", type(plugin).__name__))


class _Timed:
    """Stands in for a plugin: its one scheduling method timed, everything else passed on."""

    def __init__(self, plugin: Any, method: str, histogram: Any) -> None:
        self._plugin = plugin
        self._call = getattr(plugin, method)
        self._observe = histogram.observe
        setattr(self, method, self._timed)

    def _timed(self, *args: Any) -> Any:
        t0 = perf_counter()
        try:
            return self._call(*args)
        finally:
            self._observe(perf_counter() - t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plugin, name)


class _PoolCollector(Collector):
    def __init__(
        self, pods: PodRegistry, feed_stats: Callable[[], dict[str, dict[str, Any]]]
    ) -> None:
        self._pods = pods
        self._feed_stats = feed_stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        pods = self._pods.all()
        ready = [p for p in pods if p.healthy]
        yield GaugeMetricFamily("kvroute_pool_pods", "Pods known", value=len(pods))
        yield GaugeMetricFamily("kvroute_pool_ready_pods", "Pods healthy", value=len(ready))
        n = max(1, len(ready))
        yield GaugeMetricFamily(
            "kvroute_pool_average_kv_cache_utilization",
            "Mean KV-cache utilization of ready pods (0..1)",
            value=sum(p.metrics.kv_utilization for p in ready) / n,
        )
        yield GaugeMetricFamily(
            "kvroute_pool_average_queue_size",
            "Mean waiting requests of ready pods",
            value=sum(p.metrics.waiting for p in ready) / n,
        )
        inflight = GaugeMetricFamily(
            "kvroute_pod_inflight_requests", "Requests the picker sent and not done", labels=["pod"]
        )
        for p in pods:
            inflight.add_metric([p.endpoint], p.inflight_requests)
        yield inflight
        for feed, stats in self._feed_stats().items():
            for name, value in stats.items():
                if isinstance(value, bool) or not isinstance(value, int):
                    continue
                yield CounterMetricFamily(
                    f"kvroute_{feed}_{name}", f"{feed} {name.replace('_', ' ')}", value=value
                )
