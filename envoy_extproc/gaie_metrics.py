"""GAIE-compatible metric families, recorded next to kvroute's own with the same values.

Gateway API Inference Extension (GAIE) dashboards, alerts and autoscalers query the endpoint
picker's families by GAIE's names and labels (`pkg/epp/metrics/metrics.go` in
kubernetes-sigs/gateway-api-inference-extension, subsystems `inference_objective`,
`inference_pool`, `inference_extension`). kvroute records each observation once, through
`Paired`: the kvroute child and its GAIE twin are updated together, so the two never disagree.

Mapping (kvroute → GAIE; `model` → `model_name` and `target_model_name`, which are equal
because kvroute does not rewrite models):

- kvroute_requests_total{model,profile,result} → inference_objective_request_total
- kvroute_request_errors_total{model,kind} → inference_objective_request_error_total
  {error_code=kind}
- kvroute_request_duration_seconds → inference_objective_request_duration_seconds
- kvroute_request_sizes_bytes → inference_objective_request_sizes
- kvroute_input_tokens / kvroute_output_tokens → inference_objective_input_tokens /
  inference_objective_output_tokens
- kvroute_normalized_time_per_output_token_seconds
  → inference_objective_normalized_time_per_output_token_seconds
- kvroute_running_requests{model} → inference_objective_running_requests{model_name}
- kvroute_scheduler_e2e_duration_seconds → inference_extension_scheduler_e2e_duration_seconds
- kvroute_scheduler_plugin_duration_seconds{profile,plugin,kind}
  → inference_extension_plugin_duration_seconds{extension_point,plugin_type,plugin_name}
- kvroute_pool_ready_pods, _average_kv_cache_utilization, _average_queue_size
  → inference_pool_ready_pods, _average_kv_cache_utilization, _average_queue_size{name};
  inference_pool_per_pod_queue_size{name,model_server_pod} from the same registry
  (`model_server_pod` is the endpoint ip:port: with several target ports a pod is several
  model servers). `name` is the InferencePool's name (`--pool-name`), else "kvroute".

- kvroute_response_sizes_bytes → inference_objective_response_sizes (response body bytes;
  only where response bodies pass through the picker: `full-duplex.yaml`)

Not exported: GAIE's flow-control and latency-predictor families (kvroute has neither).

Label values are bounded: `ModelLabels` maps a model no pod serves (and that the operator did
not declare) to `other`, so clients cannot mint series by sending random model names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.face_metrics import OTHER, Bounded, ModelLabels
from router.pods import PodRegistry

__all__ = ["OTHER", "Bounded", "GaieMetrics", "GaiePoolCollector", "ModelLabels", "Paired"]

# GAIE's buckets, so quantiles computed from either exporter line up.
_GENERAL_LATENCY = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20,
    30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
_SIZES = tuple(float(2**i) for i in range(6, 31))  # 64 B .. 1 GiB
_INPUT_TOKENS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072,
    262144, 524288, 1048576,
)  # fmt: skip
_OUTPUT_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_NTPOT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_SCHEDULER = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_EXTENSION_POINTS = {"filter": "Filter", "scorer": "Scorer", "picker": "Picker"}


class Paired:
    """A kvroute labelled metric and its GAIE twin behind one `labels(...)`: the model label
    (position `model_at`) is bounded, then `to_gaie` maps kvroute's label values to GAIE's."""

    def __init__(
        self,
        kvroute: Any,
        gaie: Any,
        model_labels: Callable[[str], str],
        to_gaie: Callable[[Sequence[str]], Sequence[str]],
        model_at: int | None = 0,
    ) -> None:
        self.kvroute = kvroute
        self.gaie = gaie
        self._model_labels = model_labels
        self._to_gaie = to_gaie
        self._model_at = model_at

    def labels(self, *values: str) -> PairedChild:
        # Not cached: the served set changes with the fleet, and prometheus_client's own
        # child lookup is a dict hit.
        bounded = list(values)
        if self._model_at is not None:
            bounded[self._model_at] = self._model_labels(values[self._model_at])
        return PairedChild(self.kvroute.labels(*bounded), self.gaie.labels(*self._to_gaie(bounded)))

    def observe(self, value: float) -> None:  # unlabelled families
        self.kvroute.observe(value)
        self.gaie.observe(value)


class PairedChild:
    """Two metric children (counters, gauges or histograms) moved as one."""

    __slots__ = ("_a", "_b")

    def __init__(self, a: Any, b: Any) -> None:
        self._a = a
        self._b = b

    def inc(self, amount: float = 1) -> None:
        self._a.inc(amount)
        self._b.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._a.dec(amount)
        self._b.dec(amount)

    def observe(self, value: float) -> None:
        self._a.observe(value)
        self._b.observe(value)


def _model_pair(values: Sequence[str]) -> tuple[str, str]:
    return values[0], values[0]


class GaieMetrics:
    """GAIE's families in `registry`; `pool_name` is their pool `name` label."""

    def __init__(self, registry: CollectorRegistry, pool_name: str) -> None:
        r = registry
        self.pool_name = pool_name
        model = ["model_name", "target_model_name"]
        self.request_total = Counter(
            "inference_objective_request",
            "Counter of inference objective requests broken out for each model and target model",
            model,
            registry=r,
        )
        self.request_errors = Counter(
            "inference_objective_request_error",
            "Counter of inference objective request errors for each model and target model",
            [*model, "error_code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds",
            model,
            buckets=_GENERAL_LATENCY,
            registry=r,
        )
        self.request_sizes = Histogram(
            "inference_objective_request_sizes",
            "Inference objective request size distribution in bytes",
            model,
            buckets=_SIZES,
            registry=r,
        )
        self.response_sizes = Histogram(
            "inference_objective_response_sizes",
            "Inference objective response size distribution in bytes",
            model,
            buckets=_SIZES,
            registry=r,
        )
        self.input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution",
            model,
            buckets=_INPUT_TOKENS,
            registry=r,
        )
        self.output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution",
            model,
            buckets=_OUTPUT_TOKENS,
            registry=r,
        )
        self.ntpot = Histogram(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by the number of output tokens",
            model,
            buckets=_NTPOT,
            registry=r,
        )
        self.running = Gauge(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model",
            ["model_name"],
            registry=r,
        )
        self.scheduler_e2e = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds",
            buckets=_SCHEDULER,
            registry=r,
        )
        self.plugin_duration = Histogram(
            "inference_extension_plugin_duration_seconds",
            "Plugin processing latency for each extension point, plugin type and plugin name",
            ["extension_point", "plugin_type", "plugin_name"],
            buckets=_SCHEDULER,
            registry=r,
        )

    def pair(self, kv: Any, model_labels: Callable[[str], str]) -> dict[str, Paired]:
        """The Paired stand-ins for `kv`'s (a PickerMetrics) per-request families."""

        def errors(v: Sequence[str]) -> tuple[str, str, str]:
            return v[0], v[0], v[1]

        def plugin(v: Sequence[str]) -> tuple[str, str, str]:
            _profile, name, kind = v
            return _EXTENSION_POINTS.get(kind, kind), name, name

        def running(v: Sequence[str]) -> tuple[str]:
            return (v[0],)

        ml = model_labels
        return {
            "requests": Paired(kv.requests, self.request_total, ml, _model_pair),
            "errors": Paired(kv.errors, self.request_errors, ml, errors),
            "request_duration": Paired(kv.request_duration, self.request_duration, ml, _model_pair),
            "request_sizes": Paired(kv.request_sizes, self.request_sizes, ml, _model_pair),
            "response_sizes": Paired(kv.response_sizes, self.response_sizes, ml, _model_pair),
            "input_tokens": Paired(kv.input_tokens, self.input_tokens, ml, _model_pair),
            "output_tokens": Paired(kv.output_tokens, self.output_tokens, ml, _model_pair),
            "ntpot": Paired(kv.ntpot, self.ntpot, ml, _model_pair),
            "running": Paired(kv.running, self.running, ml, running),
            "scheduling": Paired(kv.scheduling, self.scheduler_e2e, ml, _model_pair, None),
            "plugin_duration": Paired(kv.plugin_duration, self.plugin_duration, ml, plugin, None),
        }


class GaiePoolCollector(Collector):
    """`inference_pool_*` computed at scrape time from the registry, as kvroute's pool gauges
    are (same formulas: means over ready pods)."""

    def __init__(self, pods: PodRegistry, pool_name: str) -> None:
        self._pods = pods
        self._name = pool_name

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        ready = [p for p in self._pods.all() if p.healthy]
        n = max(1, len(ready))
        pool = [self._name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["name"])
            g.add_metric(pool, value)
            return g

        yield gauge("inference_pool_ready_pods", "Ready pods in the pool", len(ready))
        yield gauge(
            "inference_pool_average_kv_cache_utilization",
            "Average KV-cache utilization of the pool's ready pods (0..1)",
            sum(p.metrics.kv_utilization for p in ready) / n,
        )
        yield gauge(
            "inference_pool_average_queue_size",
            "Average requests waiting in the pool's ready pods' queues",
            sum(p.metrics.waiting for p in ready) / n,
        )
        per_pod = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "Requests waiting in each ready pod's queue",
            labels=["name", "model_server_pod"],
        )
        for p in ready:
            per_pod.add_metric([self._name, p.endpoint], p.metrics.waiting)
        yield per_pod
