"""The `tracing:` and `logging:` config sections: plain data and their validation, and
`make_tracing`, which imports the OpenTelemetry SDK (`router.tracing`) only when tracing is on.

The logging set-up lives in `router.log_setup`; the config loader imports neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
#: Where an OTLP/HTTP collector listens by default (the OpenTelemetry Collector's port).
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4318/v1/traces"


def http_url_problem(url: str) -> str | None:
    """Why `url` is not an http(s) URL with a host, or None when it is one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is not a number or out of range
        return str(e)
    if parts.scheme not in ("http", "https"):
        return f"the scheme must be http or https, not {parts.scheme or 'none'!r}"
    if not parts.hostname:
        return "no host"
    if port is not None and port <= 0:
        return f"port {port} is out of range"
    return None


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """OpenTelemetry tracing of each request (off by default: nothing is imported then)."""

    enabled: bool = False
    #: OTLP over HTTP (protobuf): the collector's traces URL.
    endpoint: str = DEFAULT_OTLP_ENDPOINT
    #: Share of the requests that start a trace (a client's sampled `traceparent` is followed).
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        problem = http_url_problem(self.endpoint)
        if problem is not None:
            raise ValueError(f"tracing.endpoint {self.endpoint!r} is not an http(s) URL: {problem}")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing.sample_ratio must be in [0, 1], got {self.sample_ratio:g}")


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """What the router logs: at `info`, one line per state change, none per request."""

    level: str = "info"
    #: `text`: one human line per record; `json`: one JSON object per line.
    format: str = "text"
    #: One line per proxied request (method, path, status, model, pod, duration).
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.level.lower() not in LOG_LEVELS:
            raise ValueError(
                f"logging.level must be one of {', '.join(LOG_LEVELS)}, not {self.level!r}"
            )
        if self.format not in LOG_FORMATS:
            raise ValueError(
                f"logging.format must be one of {', '.join(LOG_FORMATS)}, not {self.format!r}"
            )

    @property
    def level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.level.upper()]


def make_tracing(settings: TracingSettings, service_name: str) -> Any:
    """A face's `router.tracing.RequestTracing`, or None when tracing is off. Raises
    `ValueError` when it is on and the OpenTelemetry packages are not installed."""
    if not settings.enabled:
        return None
    try:
        from router.tracing import RequestTracing
    except ImportError as e:
        raise ValueError(
            f"tracing.enabled is true but {e.name or 'OpenTelemetry'} is not installed: "
            "pip install 'kvroute[tracing]'"
        ) from None
    return RequestTracing(settings, service_name=service_name)
