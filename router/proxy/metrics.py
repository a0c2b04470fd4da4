"""The proxy's Prometheus metrics (`/metrics` of `kvroute proxy` and `kvroute sidecar`).

The `kvroute_*` families every face exports (`self.face`, a `router.face_metrics.FaceMetrics`
on the same registry: the same names and meanings as `kvroute serve`'s, so one dashboard reads
both), plus the proxy's own `kvroute_proxy_*` families (status codes, retries, upstream
failures, P/D legs, ...; the sidecar names them `kvroute_sidecar_*`).

One `CollectorRegistry` per proxy instance, so several proxies in one process (tests) do not
collide. Label children on the hot path are cached so a request costs dict lookups, not
`labels()` calls.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from router.face_metrics import FaceMetrics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SCHEDULE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)


class ProxyMetrics:
    def __init__(self, prefix: str = "kvroute_proxy") -> None:
        self.face = FaceMetrics("proxy")
        self.registry = self.face.registry
        r = self.registry
        self.requests = Counter(
            f"{prefix}_requests",
            "Requests answered, by model and HTTP status.",
            ["model", "status"],
            registry=r,
        )
        self.upstream_failures = Counter(
            f"{prefix}_upstream_failures",
            "Failed exchanges with a pod, by kind.",
            ["pod", "kind"],
            registry=r,
        )
        self.retries = Counter(f"{prefix}_retries", "Requests retried on another pod.", registry=r)
        self.rejected = Counter(
            f"{prefix}_rejected",
            "Requests refused before forwarding, by reason.",
            ["reason"],
            registry=r,
        )
        self.stripped_fields = Counter(
            f"{prefix}_stripped_fields",
            "Router-only body fields a client sent, removed before forwarding, by field.",
            ["field"],
            registry=r,
        )
        self.client_disconnects = Counter(
            f"{prefix}_client_disconnects",
            "Clients that left before the answer ended.",
            registry=r,
        )
        self.stream_errors = Counter(
            f"{prefix}_stream_errors",
            "Streams the pod broke after the client got its 200 (ended with an error event), "
            "by reason: pod_closed, idle_timeout, total_timeout.",
            ["reason"],
            registry=r,
        )
        self.ejections = Counter(
            f"{prefix}_pod_ejections",
            "Pods taken out of routing by outlier detection, by reason.",
            ["pod", "reason"],
            registry=r,
        )
        self.pd_requests = Counter(
            f"{prefix}_pd_requests",
            "Two-phase (P/D) requests by outcome of the prefill leg.",
            ["outcome"],
            registry=r,
        )
        self.inflight = Gauge(
            f"{prefix}_inflight", "Requests being forwarded, by model.", ["model"], registry=r
        )
        self.queued = Gauge(
            f"{prefix}_queued", "Requests waiting for admission, by model.", ["model"], registry=r
        )
        self.pod_healthy = Gauge(
            f"{prefix}_pod_healthy", "1 when the pod is routable.", ["pod"], registry=r
        )
        self.ttft = Histogram(
            f"{prefix}_time_to_first_byte_seconds",
            "From request arrival to the first body byte from the pod.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            f"{prefix}_request_duration_seconds",
            "From request arrival to the last byte.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.schedule_seconds = Histogram(
            f"{prefix}_schedule_seconds",
            "Time spent in Scheduler.schedule.",
            buckets=_SCHEDULE_BUCKETS,
            registry=r,
        )
        #: The shared `kvroute_tokenize_duration_seconds`.
        self.tokenize_seconds = self.face.tokenize_duration
        self._requests: dict[tuple[str, int], Counter] = {}

    def count_request(self, model: str, status: int) -> None:
        key = (model, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(model, str(status))
        child.inc()

    def watch_shared_state(self, sync: object) -> None:
        self.face.watch_shared_state(sync)

    def render(self) -> bytes:
        return generate_latest(self.registry)
