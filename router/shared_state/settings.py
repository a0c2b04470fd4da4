"""SharedStateSettings: the `shared_state:` config section (several router replicas, one store).

Plain data and its validation only; the Redis client lives in `router.shared_state.redis_sync`,
so the config loader (core) never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

BACKENDS = ("redis", "valkey")
_SCHEMES = ("redis", "rediss", "unix")


def url_problem(url: str) -> str | None:
    """Why `url` is not a Redis URL (`redis://HOST:PORT/DB`, `rediss://…`, `unix:///path`),
    or None when it is one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is not a number or out of range
        return str(e)
    if parts.scheme not in _SCHEMES:
        return f"scheme must be one of {list(_SCHEMES)}, not {parts.scheme or 'none'!r}"
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL needs a socket path"
    if not parts.hostname:
        return "no host"
    if port is not None and port <= 0:
        return f"port {port} is out of range"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"the database after the host must be a number, not {db!r}"
    return None


@dataclass(frozen=True, slots=True)
class SharedStateSettings:
    """Where the replicas share their state, and how long a silent replica's charges live."""

    #: Store type; Valkey speaks the same protocol.
    backend: str = "redis"
    url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every key this fleet of replicas uses (two fleets may share one store).
    prefix: str = "kvroute"
    #: This replica's name in the store; None = host name, pid and a random suffix.
    replica_id: str | None = None
    connect_timeout_s: float = 0.5
    #: One command's timeout; a slower store counts as down (the router routes on).
    op_timeout_s: float = 0.5
    #: A replica's in-flight charges expire this long after its last heartbeat (SIGKILL).
    lease_s: float = 5.0
    #: How often a replica refreshes its heartbeat/charge snapshot and reads the others'.
    heartbeat_s: float = 0.5
    #: Pause before trying an unreachable store again.
    retry_s: float = 0.5
    #: Index-insert history kept in the store (stream entries, ~batches) for joiners.
    stream_maxlen: int = 20_000
    #: Changes held while the store is down, published when it returns (oldest dropped).
    backlog_max: int = 20_000
    #: How long another replica's speculative (pending) precise-index insert lives here
    #: unless the pod's own KV events confirm it first.
    remote_pending_s: float = 10.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"shared_state.backend must be one of {list(BACKENDS)}, got {self.backend!r}"
            )
        problem = url_problem(self.url)
        if problem is not None:
            raise ValueError(
                f"shared_state.url {self.url!r} is not a Redis URL ({problem}); "
                "expected redis://HOST:PORT/DB"
            )
        if not self.prefix:
            raise ValueError("shared_state.prefix must not be empty")
        for name in (
            "connect_timeout_s",
            "op_timeout_s",
            "lease_s",
            "heartbeat_s",
            "retry_s",
            "stream_maxlen",
            "backlog_max",
            "remote_pending_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"shared_state.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(
                f"shared_state.heartbeat_s ({self.heartbeat_s}) must be below lease_s "
                f"({self.lease_s}), or live replicas' charges would expire"
            )
