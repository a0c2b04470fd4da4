"""ExtProcSettings: ports and behaviour of `kvroute serve` (the `extproc` config section)."""

from __future__ import annotations

from dataclasses import dataclass

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
    #: On SIGTERM: stop accepting streams, let open ones finish for this long, then cut them.
    grace_period_s: float = 15.0
    #: Put fallbacks in the destination header and metadata ("primary,fb1,fb2"). Envoy's
    #: ORIGINAL_DST cluster takes a single address from the header, so this is for gateways
    #: that understand the list (Envoy's override-host load-balancing policy).
    fallbacks_in_header: bool = False
    #: Read response headers/bodies (when Envoy sends them) for usage and first-token time.
    parse_responses: bool = True
    #: JSON (non-streaming) response bodies larger than this are not parsed for usage.
    max_response_json_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("grpc_port", "health_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(f"extproc.{name} must be a TCP port (0 = any free), got {port}")
        if self.grace_period_s < 0:
            raise ValueError("extproc.grace_period_s must be >= 0")
