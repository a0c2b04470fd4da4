"""PodRegistry: the fleet as the scheduler sees it.

Owns each pod's identity (endpoint, role, labels, models, adapters), health, the latest metrics
snapshot (written by a scraper or the simulator) and the router's own in-flight accounting
(written by the scheduler's hooks). It does no I/O. Indexes register themselves so a pod that
leaves takes its index entries with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(slots=True)
class MetricsSnapshot:
    """Latest scraped load of a pod. `taken_at` is the clock time of the scrape (None = never)."""

    waiting: int = 0
    running: int = 0
    kv_utilization: float = 0.0
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    block_size: int | None = None
    #: KV cache capacity in blocks (`cache_config_info`'s `num_gpu_blocks`, summed over
    #: engines); None when the page does not say.
    num_gpu_blocks: int | None = None
    #: `process_start_time_seconds` of the engine (wall clock); a change means it restarted.
    process_start_time: float | None = None
    #: vLLM's `prefix_cache_queries_total` / `prefix_cache_hits_total` (tokens), summed over
    #: engines; None when the page has none.
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    taken_at: float | None = None
    stale: bool = False

    def age(self, now: float) -> float:
        return float("inf") if self.taken_at is None else max(0.0, now - self.taken_at)


@dataclass(slots=True)
class Pod:
    endpoint: str
    role: Role = Role.BOTH
    labels: dict[str, str] = field(default_factory=dict)
    models: frozenset[str] = frozenset()
    adapters: frozenset[str] = frozenset()
    healthy: bool = True
    metrics: MetricsSnapshot = field(default_factory=MetricsSnapshot)
    # Router-side accounting (every replica's, with shared state): requests sent and not yet
    # completed, their uncached prompt tokens not yet prefilled (cleared at first token), and
    # how many of them have not reached their first token (queued or prefilling here: the
    # part of the scraped waiting count the router accounts for itself).
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    inflight_prefilling: int = 0
    last_picked_at: float = float("-inf")
    #: KV-event endpoint (PUB) and replay endpoint, when the pod binds them.
    kv_events_endpoint: str | None = None
    kv_replay_endpoint: str | None = None

    def serves(self, model: str) -> bool:
        """True when the pod serves `model` as a base model or a LoRA adapter (no models = any)."""
        return not self.models or model in self.models or model in self.adapters

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.endpoint.rpartition(":")
        return host.strip("[]"), int(port)


class PodRegistry:
    def __init__(self) -> None:
        self._pods: dict[str, Pod] = {}
        self._on_remove: list[Callable[[str], None]] = []
        self._on_health: list[Callable[[str, bool], None]] = []
        self.version = 0

    def on_remove(self, callback: Callable[[str], None]) -> None:
        """Call `callback(endpoint)` whenever a pod leaves (e.g. `BlockIndex.drop_pod`)."""
        self._on_remove.append(callback)

    def on_health_change(self, callback: Callable[[str, bool], None]) -> None:
        """Call `callback(endpoint, healthy)` whenever a pod's health flips (e.g. to forget
        the blocks of a pod that went down: it may come back as a restarted, empty engine)."""
        self._on_health.append(callback)

    def upsert(self, pod: Pod) -> Pod:
        """Add a pod or update its identity fields, keeping the in-flight state of a known one."""
        cur = self._pods.get(pod.endpoint)
        if cur is None:
            self._pods[pod.endpoint] = pod
            self.version += 1
            return pod
        cur.role = pod.role
        cur.labels = pod.labels
        cur.models = pod.models
        cur.adapters = pod.adapters
        cur.kv_events_endpoint = pod.kv_events_endpoint
        cur.kv_replay_endpoint = pod.kv_replay_endpoint
        self.version += 1
        return cur

    def remove(self, endpoint: str) -> None:
        if self._pods.pop(endpoint, None) is not None:
            self.version += 1
            for cb in self._on_remove:
                cb(endpoint)

    def replace_all(self, pods: list[Pod]) -> None:
        """Make the registry exactly `pods`, keeping state of pods that stay."""
        keep = {p.endpoint for p in pods}
        for ep in [ep for ep in self._pods if ep not in keep]:
            self.remove(ep)
        for p in pods:
            self.upsert(p)

    def get(self, endpoint: str) -> Pod | None:
        return self._pods.get(endpoint)

    def __getitem__(self, endpoint: str) -> Pod:
        return self._pods[endpoint]

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self._pods

    def __iter__(self) -> Iterator[Pod]:
        return iter(self._pods.values())

    def __len__(self) -> int:
        return len(self._pods)

    def all(self) -> list[Pod]:
        return list(self._pods.values())

    def models(self) -> set[str]:
        out: set[str] = set()
        for p in self._pods.values():
            out |= p.models
            out |= p.adapters
        return out

    def set_health(self, endpoint: str, healthy: bool) -> None:
        pod = self._pods.get(endpoint)
        if pod is not None and pod.healthy != healthy:
            pod.healthy = healthy
            for cb in self._on_health:
                cb(endpoint, healthy)

    def set_metrics(self, endpoint: str, snapshot: MetricsSnapshot) -> None:
        pod = self._pods.get(endpoint)
        if pod is not None:
            pod.metrics = snapshot
