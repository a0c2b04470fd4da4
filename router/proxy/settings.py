"""`ProxySettings`: how the OpenAI proxy listens, forwards, retries, times out and admits.

Loaded from the router config's `proxy:` section by field name; every field has a default.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.outlier import OutlierPolicy


@dataclass(frozen=True, slots=True)
class ProxySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Scheduling profile to use (None = the config's handler decides).
    profile: str | None = None
    # ------------------------------------------------------------- upstream connections
    #: Pooled keep-alive HTTP/1.1 connections per pod.
    pool_per_pod: int = 256
    keepalive_s: float = 30.0
    connect_timeout_s: float = 2.0
    #: Until the response headers (non-streaming) or the first body chunk (streaming).
    first_byte_timeout_s: float = 60.0
    #: Whole exchange with the pod, from connect to the last byte.
    total_timeout_s: float = 600.0
    #: Other pods tried after a connect failure, reset or 5xx before the first byte (a
    #: request answered 5xx by two pods is not tried again: the request is the likely cause).
    retries: int = 1
    #: Inside a stream: no chunk from the pod for this long ends the client's stream with an
    #: error event (a stopped or wedged pod; the first chunk has `first_byte_timeout_s`).
    stream_idle_timeout_s: float = 30.0
    # ------------------------------------------------------------- outlier ejection
    #: 5xx answers to this many distinct requests in a row eject a pod (a refused
    #: connection ejects at once); see router/outlier.py.
    outlier_consecutive_5xx: int = 5
    #: First ejection for 5xx; the n-th in a row lasts n times this, up to the max.
    outlier_base_ejection_s: float = 10.0
    outlier_max_ejection_s: float = 300.0
    #: Share of the pods 5xx ejections may take out at once (at least one).
    outlier_max_ejection_percent: float = 50.0
    # ------------------------------------------------------------- client connections
    #: A client must send its whole body within this; else 408 and the connection closes.
    body_read_timeout_s: float = 30.0
    #: Requests open at once (each holds a client connection); beyond it 503 with Retry-After
    #: (0 = unbounded).
    max_connections: int = 4096
    # ------------------------------------------------------------- health of ejected pods
    #: A pod that failed a request is probed on this path until it answers 200.
    health_path: str = "/health"
    health_interval_s: float = 0.5
    health_timeout_s: float = 1.0
    # ------------------------------------------------------------- admission
    #: Requests forwarded at once per model (0 = unbounded); more wait in the queue.
    max_inflight_per_model: int = 1024
    #: Requests waiting per model; beyond it, 429 with Retry-After.
    max_queued_per_model: int = 1024
    #: A queued request waiting longer than this gets 429.
    queue_timeout_s: float = 30.0
    retry_after_s: int = 1
    # ------------------------------------------------------------- debug and pass-through
    debug_header: str = "x-kvroute-debug"
    decision_header: str = "x-kvroute-decision"
    #: Pods in `/v1/models` answers are cached this long.
    models_cache_s: float = 2.0
    access_log: bool = False

    def __post_init__(self) -> None:
        for name in (
            "connect_timeout_s",
            "first_byte_timeout_s",
            "total_timeout_s",
            "health_interval_s",
            "health_timeout_s",
            "queue_timeout_s",
            "keepalive_s",
            "stream_idle_timeout_s",
            "outlier_base_ejection_s",
            "outlier_max_ejection_s",
            "body_read_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"proxy.{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "retries",
            "max_inflight_per_model",
            "max_queued_per_model",
            "retry_after_s",
            "max_connections",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"proxy.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.pool_per_pod < 1:
            raise ValueError("proxy.pool_per_pod must be >= 1")
        if not self.health_path.startswith("/"):
            raise ValueError(f"proxy.health_path must start with '/': {self.health_path!r}")
        self.outlier_policy()  # its own checks, named as proxy.outlier_* fields

    def outlier_policy(self) -> OutlierPolicy:
        try:
            return OutlierPolicy(
                consecutive_5xx=self.outlier_consecutive_5xx,
                base_ejection_s=self.outlier_base_ejection_s,
                max_ejection_s=self.outlier_max_ejection_s,
                max_ejection_percent=self.outlier_max_ejection_percent,
            )
        except ValueError as e:
            raise ValueError(str(e).replace("outlier.", "proxy.outlier_")) from None
