"""The live fleet state behind a face: pod registry, metrics scraper, KV-event subscriber
feeding the scheduler's precise index, and discovery (the config file's `pods:`, reloaded on
change, or the Kubernetes API).

One wiring for every live face (proxy, ext_proc picker), so both see a fleet the same way:
events are on when the config has an `events` section or a pod names a `kv_events_endpoint`
(connect mode unless the section says bind), and only in token block mode (keys of text prompts
in chars mode never equal the token keys of events; the approximate index is used instead, with
a warning). Nothing here routes or forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from router.config import RouterConfig
from router.discovery.kubernetes import KubernetesDiscovery, KubernetesDiscoverySettings
from router.discovery.static import StaticDiscovery, StaticDiscoverySettings
from router.events.ingest import KVEventIngester
from router.events.settings import EventsSettings
from router.events.subscriber import KVEventSubscriber
from router.index import BlockIndex
from router.pods import PodRegistry
from router.scrape import MetricsScraper

log = logging.getLogger(__name__)


class FleetFeeds:
    def __init__(
        self,
        config: RouterConfig,
        registry: PodRegistry | None = None,
        config_path: str | Path | None = None,
        kubernetes: KubernetesDiscoverySettings | None = None,
    ) -> None:
        """`config_path`: re-read its `pods:` when the file changes (static discovery).
        `kubernetes`: take the pods from the Kubernetes API instead (the InferencePool's
        selector); `start` then waits for the first pod list."""
        self.config = config
        if registry is None:
            registry = PodRegistry()
            for pod in config.pods:
                registry.upsert(pod)
        self.registry = registry
        events = config.events
        wants_events = (
            events is not None
            or any(p.kv_events_endpoint for p in config.pods)
            or (kubernetes is not None and kubernetes.kv_events_port is not None)
        )
        if wants_events and config.blocks.mode != "tokens":
            log.warning(
                "KV events are ignored: blocks.mode is %r; precise prefix routing needs "
                "blocks.mode 'tokens' with the pods' tokenizer (approximate index used instead)",
                config.blocks.mode,
            )
            wants_events = False
        self.precise_index: BlockIndex | None = None
        self.subscriber: KVEventSubscriber | None = None
        if wants_events:
            events = events or EventsSettings(mode="connect")
            self.precise_index = BlockIndex(tier_weights=config.prefix_index.tier_weights)
            ingester = KVEventIngester(self.precise_index, config.blocks, events)
            self.subscriber = KVEventSubscriber(
                ingester, events, resolve_pod=lambda pod: pod if pod in self.registry else None
            )
        self.scraper = MetricsScraper(self.registry, config.scrape)
        self.discovery: StaticDiscovery | KubernetesDiscovery | None = None
        if kubernetes is not None:
            self.discovery = KubernetesDiscovery(self.registry, kubernetes)
        elif config_path is not None:
            self.discovery = StaticDiscovery(
                self.registry, StaticDiscoverySettings(path=str(config_path))
            )
        self._sync_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.discovery is not None:
            await self.discovery.start()
            if isinstance(self.discovery, KubernetesDiscovery):
                await self.discovery.synced.wait()
        if self.subscriber is not None:
            self.subscriber.attach(self.registry)
            await self.subscriber.start()
            self._sync_kv_pods()
            self._sync_task = asyncio.create_task(self._follow_registry(), name="kv-pod-sync")
        await self.scraper.scrape_once()
        await self.scraper.start()

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        await self.scraper.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.subscriber is not None:
            await self.subscriber.close()

    def _sync_kv_pods(self) -> None:
        """Connect mode: listen to every pod that names a PUB endpoint; register replay ones."""
        sub = self.subscriber
        if sub is None:
            return
        connect = sub.settings.mode == "connect"
        for pod in self.registry:
            endpoint = pod.kv_events_endpoint if connect else None
            if endpoint or pod.kv_replay_endpoint:
                sub.add_pod(pod.endpoint, endpoint, pod.kv_replay_endpoint)

    async def _follow_registry(self) -> None:
        """Pods added by discovery get their KV-event sockets (removals are `attach`ed)."""
        seen = self.registry.version
        while True:
            await asyncio.sleep(0.5)
            if self.registry.version != seen:
                seen = self.registry.version
                self._sync_kv_pods()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters of every feed, by feed, as plain data (for metrics and debug pages)."""
        out: dict[str, dict[str, Any]] = {"scrapes": _as_dict(self.scraper.stats)}
        if self.subscriber is not None:
            out["kv_events"] = _as_dict(self.subscriber.stats)
        if self.discovery is not None:
            out["discovery"] = _as_dict(self.discovery.stats)
        return out


def _as_dict(stats: Any) -> dict[str, Any]:
    fields = getattr(stats, "__dataclass_fields__", {})
    return {name: getattr(stats, name) for name in fields}
