"""ExtProcSettings: ports and behaviour of `kvroute serve` (the `extproc` config section)."""

from __future__ import annotations

from dataclasses import dataclass

from router.outlier import OutlierPolicy

#: Conventional endpoint-picker ports (GAIE): ext_proc gRPC, gRPC health, Prometheus.
GRPC_PORT = 9002
HEALTH_PORT = 9003
METRICS_PORT = 9090


@dataclass(frozen=True, slots=True)
class ExtProcSettings:
    host: str = "0.0.0.0"
    grpc_port: int = GRPC_PORT
    health_port: int = HEALTH_PORT
    metrics_port: int = METRICS_PORT
    #: On SIGTERM, first: readiness turns NOT_SERVING while the picker keeps taking new
    #: streams this long, so gateways and Kubernetes endpoints stop sending before it refuses
    #: (readiness probe 2 s x 2 failures, Envoy health check 1 s, plus propagation).
    lame_duck_s: float = 10.0
    #: Then: refuse new streams (GOAWAY) and let open ones finish for up to this long before
    #: cutting them. Sized for LLM streams: the shipped routes allow a request 600 s.
    grace_period_s: float = 600.0
    #: Put fallbacks in the destination header and metadata ("primary,fb1,fb2"). Envoy's
    #: ORIGINAL_DST cluster takes a single address from the header, so this is for gateways
    #: that understand the list (Envoy's override-host load-balancing policy).
    fallbacks_in_header: bool = False
    #: Read response headers/bodies (when Envoy sends them) for usage and first-token time.
    parse_responses: bool = True
    #: JSON (non-streaming) response bodies larger than this are not parsed for usage.
    max_response_json_bytes: int = 1 << 20
    #: Eject pods on the failures the picker sees through Envoy (envoy_extproc/passive_health.py,
    #: policy router/outlier.py): a pod Envoy could not connect to at once, 5xx answers after
    #: `outlier_consecutive_5xx` distinct requests in a row; back after the ejection time
    #: (`outlier_base_ejection_s`, longer each time in a row) and a good metrics scrape.
    passive_health: bool = True
    outlier_consecutive_5xx: int = 5
    outlier_base_ejection_s: float = 10.0

    def outlier_policy(self) -> OutlierPolicy:
        return OutlierPolicy(
            consecutive_5xx=self.outlier_consecutive_5xx,
            base_ejection_s=self.outlier_base_ejection_s,
            max_ejection_s=max(300.0, self.outlier_base_ejection_s),
        )

    def __post_init__(self) -> None:
        for name in ("grpc_port", "health_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(f"extproc.{name} must be a TCP port (0 = any free), got {port}")
        for name in ("lame_duck_s", "grace_period_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"extproc.{name} must be >= 0 seconds")
        try:
            self.outlier_policy()
        except ValueError as e:
            raise ValueError(str(e).replace("outlier.", "extproc.outlier_", 1)) from None
