"""Ejection of pods that failed requests, and their return once `/health` answers 200.

What ejects is decided by `router.outlier.OutlierDetector` (a refused connection at once; 5xx
answers only for several distinct requests in a row); this module applies its verdicts to the
registry and probes the ejected pods. A pod ejected for 5xx comes back when its ejection time
is over and its health check passes; one ejected for a failed connection as soon as its health
check passes (a restarted pod is back within one probe interval).

The metrics scraper only revives pods it marked down itself, so a pod the proxy ejected stays
out of routing until this prober lets it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from router.outlier import Ejection, Outcome, OutlierDetector
from router.pods import PodRegistry
from router.proxy.errors import UpstreamFailure
from router.proxy.metrics import ProxyMetrics
from router.proxy.settings import ProxySettings
from router.proxy.upstream import Upstream

log = logging.getLogger(__name__)

#: Failure kinds that say the pod itself is gone (counted as connect failures).
_POD_GONE = frozenset({"connect", "reset", "broken_stream"})


class HealthProber:
    def __init__(
        self,
        registry: PodRegistry,
        upstream: Upstream,
        settings: ProxySettings,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self.outliers = OutlierDetector(settings.outlier_policy(), clock)
        self._fleet_version = -1
        #: Pods this prober took out of routing (and will let back in).
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

    # ------------------------------------------------------------------ outcomes
    def record_success(self, endpoint: str) -> None:
        self._sync_fleet()
        self.outliers.record_success(endpoint)

    def record_failure(self, f: UpstreamFailure, request_id: str) -> Ejection | None:
        """Tell the outlier detector; eject the pod if it says so. Timeouts are not counted:
        a slow pod is loaded, not dead (load-aware scorers steer around it)."""
        self._sync_fleet()
        if f.kind in _POD_GONE:
            ej = self.outliers.record_connect_failure(f.endpoint)
        elif f.kind == "status_5xx":
            ej = self.outliers.record_5xx(f.endpoint, request_id)
        else:
            return None
        if ej is not None:
            self.eject(
                f.endpoint,
                f"{ej.reason.value} (ejection {ej.count}, {ej.until - ej.at:g}s at least): {f}",
            )
            if self.metrics is not None:
                self.metrics.ejections.labels(f.endpoint, ej.reason.value).inc()
        return ej

    def readmit_least_recently_ejected(self, candidates: Collection[str]) -> str | None:
        """Every candidate is out: let the one ejected longest ago back in (and return it)
        rather than refusing the request. Its next failure ejects it for longer."""
        ours = [ep for ep in candidates if ep in self.ejected]
        if not ours:
            return None
        pod = self.outliers.least_recently_ejected(ours)
        if pod is None:  # ejection time over, health check not passed yet: oldest first
            pod = ours[0]
        log.info("every pod of the request is ejected; trying %s again", pod)
        self._readmit(pod)
        return pod

    def _sync_fleet(self) -> None:
        if self._fleet_version != self.registry.version:
            self._fleet_version = self.registry.version
            self.outliers.set_fleet(p.endpoint for p in self.registry.all())

    def _readmit(self, endpoint: str) -> None:
        self.ejected.discard(endpoint)
        self.outliers.readmit(endpoint)
        self.registry.set_health(endpoint, True)
        if self.metrics is not None:
            self.metrics.pod_healthy.labels(endpoint).set(1)

    # ------------------------------------------------------------------ ejection
    def eject(self, endpoint: str, reason: str) -> None:
        """Take the pod out of routing until its health check passes (and, for an outlier
        ejection, its ejection time is over)."""
        pod = self.registry.get(endpoint)
        if pod is None:
            return
        if endpoint not in self.ejected:
            # One line per state change: a pod the scraper marked unhealthy already is out of
            # routing, and its line said so.
            level = logging.WARNING if pod.healthy else logging.DEBUG
            log.log(level, "pod %s ejected: %s", endpoint, reason)
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
        if status != 200 or endpoint not in self.ejected:
            return
        ej = self.outliers.ejection(endpoint)
        if ej is not None and ej.reason is Outcome.HTTP_5XX:
            return  # up, but it failed too many requests: out until its time is over
        self._readmit(endpoint)
        log.info("pod %s passed its health check; routable again", endpoint)

    async def _run(self) -> None:
        while True:
            if not self.ejected:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.settings.health_interval_s)
            await self.probe_once()
