"""The `kvroute_*` metric families every face exports (`kvroute proxy` and `kvroute serve`).

One set, one way of recording: a face calls `refused`, `routed`, `first_token`, `completed`
and `failed` with its `Decision`, and the same families move in either face, so one dashboard
reads both. Only `kvroute_open_requests{face}` carries the face: what is open differs (HTTP
requests in the proxy, ext_proc streams in the picker); every other family means the same in
each face:

- kvroute_requests_total{model,profile,result}: requests finished, result ok|error
- kvroute_request_errors_total{model,kind}: refused (request error codes) or failed
  (upstream_*, client_disconnect)
- kvroute_decisions_total{profile,result}: result single|pd or an error code
- kvroute_stripped_fields_total{field}: router-only body fields clients sent
- kvroute_request_duration_seconds{model}: request start to the response's end
- kvroute_time_to_first_token_seconds{model}: request start to the first response body byte
- kvroute_normalized_time_per_output_token_seconds{model}, kvroute_input_tokens{model},
  kvroute_output_tokens{model}: from the response's usage, where the face sees it
- kvroute_running_requests{model}: routed and not finished
- kvroute_scheduler_e2e_duration_seconds, kvroute_scheduler_plugin_duration_seconds
  {profile,plugin,kind} (`time_plugins`), kvroute_tokenize_duration_seconds
- kvroute_prefix_hit_ratio: fraction of the prompt's blocks the chosen pod holds
- kvroute_request_sizes_bytes{model}, kvroute_response_sizes_bytes{model} (where the face
  sees the response body)
- at scrape time (`watch_feeds`): kvroute_pool_pods, kvroute_pool_ready_pods,
  kvroute_pool_average_kv_cache_utilization, kvroute_pool_average_queue_size,
  kvroute_pod_inflight_requests{pod}, kvroute_scrapes_*_total, kvroute_kv_events_*_total,
  kvroute_discovery_*_total, the per-pod KV-event feed gauges (`FleetFeeds.collect`), and the
  decomposed hit rate (`router.reuse`): kvroute_prompt_tokens_total{model,pod},
  kvroute_prefix_tokens_available_total{model}, kvroute_prefix_tokens_captured_total
  {model,pod}, kvroute_prefix_tokens_delivered_total{model,pod}.

Model label values are bounded (`ModelLabels`): a model no pod serves and nobody declared is
`other`, so clients cannot mint series. Label children are cached, so a request pays dict
lookups, not `labels()` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.pods import PodRegistry
from router.reuse import ReuseCollector, ReuseLedger
from router.tokenize_worker import TOKENIZE_BUCKETS

if TYPE_CHECKING:
    from router.feeds import FleetFeeds
    from router.scheduler import Decision

FACES = ("proxy", "extproc")

#: The label value of every model outside the served set.
OTHER = "other"
#: Placeholders used before a model is known; fixed values, kept as they are.
_FIXED = frozenset({"-", OTHER})

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (1, 16, 64, 256, 1024, 4096, 8192, 16384, 32768, 131072)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
_SIZE_BUCKETS = tuple(float(4**i) for i in range(3, 16))


class ModelLabels:
    """`model` as a label value: itself when the pool serves it or it was declared, else
    `other`. The served set is re-read when the registry changes (its `version`)."""

    def __init__(self, declared: Collection[str] = ()) -> None:
        self.declared = frozenset(declared)
        self._registry: PodRegistry | None = None
        self._version = -1
        self._known: frozenset[str] | None = None

    def follow(self, registry: PodRegistry) -> None:
        self._registry = registry
        self._version = -1

    def generation(self) -> int:
        """Changes whenever the bound may have changed (label caches are cleared then)."""
        registry = self._registry
        return -2 if registry is None else registry.version

    def __call__(self, model: str) -> str:
        if model in _FIXED:
            return model
        registry = self._registry
        if registry is None and not self.declared:
            return model  # not bound to a pool (a bare Picker in tests): nothing to bound by
        if registry is not None and registry.version != self._version:
            self._known = self.declared | frozenset(registry.models())
            self._version = registry.version
        known = self._known if self._known is not None else self.declared
        return model if model in known else OTHER


class Bounded:
    """A labelled metric whose first label is a model, bounded by `ModelLabels`."""

    def __init__(self, metric: Any, model_labels: Callable[[str], str]) -> None:
        self.kvroute = metric
        self._model_labels = model_labels

    def labels(self, model: str, *rest: str) -> Any:
        return self.kvroute.labels(self._model_labels(model), *rest)


class FaceMetrics:
    """The shared families in `registry` (a new one by default) for `face`."""

    def __init__(
        self,
        face: str,
        registry: CollectorRegistry | None = None,
        models: Collection[str] = (),
    ) -> None:
        """`models`: model names allowed as label values besides those the pods serve."""
        self.face = face
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests: Any = Counter(
            "kvroute_requests", "Requests routed", ["model", "profile", "result"], registry=r
        )
        self.errors: Any = Counter(
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
        self.request_duration: Any = Histogram(
            "kvroute_request_duration_seconds",
            "Request start to response end",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft: Any = Histogram(
            "kvroute_time_to_first_token_seconds",
            "Request start to the first response body chunk",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ntpot: Any = Histogram(
            "kvroute_normalized_time_per_output_token_seconds",
            "Request duration divided by output tokens",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.input_tokens: Any = Histogram(
            "kvroute_input_tokens", "Prompt tokens", ["model"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.output_tokens: Any = Histogram(
            "kvroute_output_tokens",
            "Completion tokens",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.running: Any = Gauge(
            "kvroute_running_requests", "Requests routed and not finished", ["model"], registry=r
        )
        self.scheduling: Any = Histogram(
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
        self.plugin_duration: Any = Histogram(
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
        self.request_sizes: Any = Histogram(
            "kvroute_request_sizes_bytes",
            "Request body bytes routed",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.response_sizes: Any = Histogram(
            "kvroute_response_sizes_bytes",
            "Response body bytes (only where response bodies pass through the router)",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.open_requests = Gauge(
            "kvroute_open_requests",
            "Client exchanges open now: HTTP requests (proxy) or ext_proc streams (extproc)",
            ["face"],
            registry=r,
        ).labels(face)
        self.model_labels = ModelLabels(models)
        self._bind_models()
        self._pods: PodRegistry | None = None
        self.reuse = ReuseLedger()
        r.register(ReuseCollector(self.reuse))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._children_gen = -3

    def _bind_models(self) -> None:
        """Bound the model label of the per-model families (a subclass may pair them)."""
        ml = self.model_labels
        for name in (
            "requests",
            "errors",
            "request_duration",
            "ttft",
            "ntpot",
            "input_tokens",
            "output_tokens",
            "running",
            "request_sizes",
            "response_sizes",
        ):
            setattr(self, name, Bounded(getattr(self, name), ml))

    # ------------------------------------------------------------------ wiring
    def watch_pool(
        self, pods: PodRegistry, feed_stats: Callable[[], dict[str, dict[str, Any]]]
    ) -> None:
        """Export pool gauges and the feeds' counters (computed at scrape time); bound model
        labels by what `pods` serve."""
        self._pods = pods
        self.model_labels.follow(pods)
        self.registry.register(PoolCollector(pods, feed_stats))

    def watch_feeds(self, feeds: FleetFeeds) -> None:
        """`watch_pool` on a face's live fleet, plus its per-pod KV-event gauges, and the
        pods' scraped prefix-cache hits into the reuse counts."""
        self.watch_pool(feeds.registry, feeds.stats)
        self.registry.register(feeds)
        feeds.scraper.on_snapshot(
            lambda pod, snap: self.reuse.on_engine_counters(
                pod, snap.prefix_cache_hits, snap.prefix_cache_queries
            )
        )
        feeds.registry.on_remove(self.reuse.forget_pod)

    def watch_shared_state(self, sync: Any) -> None:
        """Export `kvroute_shared_state_*` (up, lag, errors) of a `RedisSync`."""
        from router.shared_state.metrics import SharedStateCollector

        self.registry.register(SharedStateCollector(sync))

    def _child(self, family: Any, *values: str) -> Any:
        """`family.labels(*values)`, cached (values must be bounded label values)."""
        gen = self.model_labels.generation()
        if gen != self._children_gen:
            self._children.clear()
            self._children_gen = gen
        key = (id(family), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    # ------------------------------------------------------------------ recording
    def refused(self, model: str, code: str) -> None:
        """A request refused before any decision (parse, path, no pod...)."""
        self._child(self.errors, self.model_labels(model), code).inc()
        self._child(self.decisions, "-", code).inc()

    def routed(self, decision: Decision, body_bytes: int | None = None) -> None:
        """A decision committed (after `Scheduler.on_pick`)."""
        model = self.model_labels(decision.request.model)
        self.scheduling.observe(decision.elapsed_s)
        self._child(self.decisions, decision.profile, "pd" if decision.prefill else "single").inc()
        self._child(self.running, model).inc()
        if body_bytes is not None:
            self._child(self.request_sizes, model).observe(body_bytes)
        main = decision.results.get(decision.profile)
        if main is not None and decision.request.block_keys:
            for s in main.pods:
                if s.endpoint == decision.target:
                    self.prefix_hit.observe(s.prefix_hit)
                    break
        self.reuse.on_decision(
            model,
            decision.prefill or decision.target,
            decision.prompt_tokens,
            decision.available_tokens,
            decision.captured_tokens,
        )

    def first_token(self, decision: Decision, elapsed_s: float) -> None:
        self._child(self.ttft, self.model_labels(decision.request.model)).observe(elapsed_s)

    def completed(
        self,
        decision: Decision,
        usage: dict[str, Any] | None,
        elapsed_s: float,
        response_bytes: int | None = None,
        endpoint: str | None = None,
    ) -> None:
        """The pod answered (status below 500). `endpoint`: the pod that answered (default
        the target); `response_bytes`: the body's length where the face saw it."""
        model = self.model_labels(decision.request.model)
        self._child(self.running, model).dec()
        self._child(self.requests, model, decision.profile, "ok").inc()
        self._child(self.request_duration, model).observe(elapsed_s)
        if response_bytes is not None:
            self._child(self.response_sizes, model).observe(response_bytes)
        if not usage:
            return
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int):
            self._child(self.input_tokens, model).observe(prompt)
        if isinstance(completion, int):
            self._child(self.output_tokens, model).observe(completion)
            if completion > 0:
                self._child(self.ntpot, model).observe(elapsed_s / completion)
        self.reuse.on_usage(model, endpoint or decision.target, usage, decision.prompt_tokens)

    def failed(self, decision: Decision, kind: str) -> None:
        """The request failed after its decision (`kind`: upstream_<status>, ...)."""
        model = self.model_labels(decision.request.model)
        self._child(self.running, model).dec()
        self._child(self.requests, model, decision.profile, "error").inc()
        self._child(self.errors, model, kind).inc()

    def stripped(self, field: str) -> None:
        self._child(self.stripped_fields, field).inc()


def time_plugins(scheduler: Any, metrics: FaceMetrics) -> None:
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


class PoolCollector(Collector):
    """Pool gauges, per-pod in-flight requests and the feeds' counters, at scrape time."""

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
            "kvroute_pod_inflight_requests", "Requests the router sent and not done", labels=["pod"]
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
