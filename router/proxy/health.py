"""Ejection of pods that failed a request, and their return once `/health` answers 200.

The metrics scraper only revives pods it marked down itself, so a pod the proxy ejected stays
out of routing until this prober sees it healthy again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from router.pods import PodRegistry
from router.proxy.errors import UpstreamFailure
from router.proxy.metrics import ProxyMetrics
from router.proxy.settings import ProxySettings
from router.proxy.upstream import Upstream

log = logging.getLogger(__name__)


class HealthProber:
    def __init__(
        self,
        registry: PodRegistry,
        upstream: Upstream,
        settings: ProxySettings,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self.ejected: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="proxy-health-prober")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def eject(self, endpoint: str, reason: str) -> None:
        """Take the pod out of routing until its health check passes."""
        if endpoint not in self.registry:
            return
        if endpoint not in self.ejected:
            log.warning("pod %s ejected: %s", endpoint, reason)
        self.ejected.add(endpoint)
        self.registry.set_health(endpoint, False)
        if self.metrics is not None:
            self.metrics.pod_healthy.labels(endpoint).set(0)
        self._wake.set()

    async def probe_once(self) -> None:
        """Probe every ejected pod at once; re-admit those answering 200."""
        for ep in [ep for ep in self.ejected if ep not in self.registry]:
            self.ejected.discard(ep)
        await asyncio.gather(*(self._probe(ep) for ep in list(self.ejected)))

    async def _probe(self, endpoint: str) -> None:
        try:
            status, _ = await self.upstream.get(
                endpoint, self.settings.health_path, self.settings.health_timeout_s
            )
        except UpstreamFailure:
            return
        if status == 200 and endpoint in self.ejected:
            self.ejected.discard(endpoint)
            self.registry.set_health(endpoint, True)
            if self.metrics is not None:
                self.metrics.pod_healthy.labels(endpoint).set(1)
            log.info("pod %s passed its health check; routable again", endpoint)

    async def _run(self) -> None:
        while True:
            if not self.ejected:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.settings.health_interval_s)
            await self.probe_once()
