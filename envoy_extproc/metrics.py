"""The picker's Prometheus metrics, served on the metrics port: the `kvroute_*` families every
face exports (`router.face_metrics`, with `face="extproc"`), the ext_proc stream gauge and
GAIE's families.

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
  kvroute_extproc_streams_active (= kvroute_open_requests{face="extproc"}),
  kvroute_kv_events_*_total, kvroute_scrapes_*_total, kvroute_discovery_*_total, and the
  decomposed hit rate (kvroute_prompt_tokens_total, kvroute_prefix_tokens_{available,
  captured,delivered}_total, `router.reuse`): ours, no GAIE equivalent.

- kvroute_scheduler_plugin_duration_seconds{profile,plugin,kind}
  → inference_extension_plugin_duration_seconds (timed by wrapping each profile's
  filters, scorers and picker in `time_plugins`; the scheduler itself keeps no timings).

GAIE's families themselves are exported too, with the same values (`gaie_metrics.py`): the
per-request families below are `Paired` stand-ins that update both, and bound the model
label (a model no pod serves, and not declared, is `other` in both).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from envoy_extproc.gaie_metrics import GaieMetrics, GaiePoolCollector, PairedChild
from router.face_metrics import Bounded, FaceMetrics, time_plugins
from router.pods import PodRegistry

__all__ = ["PickerMetrics", "time_plugins"]


class PickerMetrics(FaceMetrics):
    """All series of one picker, in their own `CollectorRegistry`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        pool_name: str = "kvroute",
        models: Collection[str] = (),
    ) -> None:
        """`pool_name`: GAIE's pool `name` label; `models`: model names allowed as label
        values besides those the pods serve."""
        self._pool_name = pool_name
        super().__init__("extproc", registry, models)
        streams = Gauge(
            "kvroute_extproc_streams_active", "Open ext_proc streams", registry=self.registry
        )
        #: Moves `kvroute_extproc_streams_active` and `kvroute_open_requests{face="extproc"}`.
        self.streams = PairedChild(streams, self.open_requests)

    def _bind_models(self) -> None:
        self.gaie = GaieMetrics(self.registry, self._pool_name)
        for name, paired in self.gaie.pair(self, self.model_labels).items():
            setattr(self, name, paired)
        self.ttft = Bounded(self.ttft, self.model_labels)  # no GAIE twin, same bound

    def watch_pool(
        self, pods: PodRegistry, feed_stats: Callable[[], dict[str, dict[str, Any]]]
    ) -> None:
        super().watch_pool(pods, feed_stats)
        self.registry.register(GaiePoolCollector(pods, self.gaie.pool_name))
