"""PassiveHealth: the picker takes pods out of routing on the failures it sees through Envoy.

The picker reads every response's status (response headers reach it in every shipped mode),
so it learns of a dead pod on the first request Envoy could not deliver, long before the
metrics scraper's `unhealthy_after` failed scrapes. What ejects is decided by
`router.outlier.OutlierDetector` (the proxy's policy, shared): a pod Envoy could not connect
to (Envoy's local reply, tagged by the bootstrap's `local_reply_config` with
`UPSTREAM_FAILURE_HEADER`) is ejected at once; 5xx answers from the pod itself only after
several distinct requests in a row, so one bad request cannot take a pod out.

Ejection writes `registry.set_health(endpoint, False)`. `tick()` lets a pod back once its
ejection time is over and a metrics scrape has succeeded since it was ejected (a pod that is
still dead stays out; the scraper marks it down on its own as well). No I/O here: the server
calls `tick()` on a timer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from router.outlier import Ejection, OutlierDetector, OutlierPolicy
from router.pods import PodRegistry

log = logging.getLogger(__name__)

#: Set by the shipped bootstraps on Envoy's own reply when the pod refused or dropped the
#: connection (response flags UF, URX, UC, UR, UH, LH); the picker removes it before the
#: client sees the response.
UPSTREAM_FAILURE_HEADER = "x-kvroute-upstream-failure"


class PassiveHealth:
    def __init__(
        self,
        registry: PodRegistry,
        policy: OutlierPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_eject: Callable[[str, Ejection], None] | None = None,
    ) -> None:
        self.registry = registry
        self.outliers = OutlierDetector(policy, clock)
        self.clock = clock
        self.on_eject = on_eject
        #: Pods this component took out of routing, with their ejection.
        self.ejected: dict[str, Ejection] = {}
        self._fleet_version = -1

    def record_success(self, endpoint: str) -> None:
        self._sync_fleet()
        self.outliers.record_success(endpoint)

    def record_failure(
        self, endpoint: str, status: int, request_id: str, unreachable: bool
    ) -> Ejection | None:
        """One failed exchange with `endpoint`: `unreachable` when Envoy could not reach the
        pod, else the pod's own `status`. Statuses below 500 and no status at all (the
        client went away) say nothing about the pod."""
        self._sync_fleet()
        if unreachable:
            ej = self.outliers.record_connect_failure(endpoint)
        elif status >= 500:
            ej = self.outliers.record_5xx(endpoint, request_id)
        else:
            return None
        if ej is not None and endpoint in self.registry:
            log.warning(
                "pod %s ejected by passive health: %s (ejection %d, %gs at least)",
                endpoint,
                ej.reason.value,
                ej.count,
                ej.until - ej.at,
            )
            self.ejected[endpoint] = ej
            self.registry.set_health(endpoint, False)
            if self.on_eject is not None:
                self.on_eject(endpoint, ej)
        return ej

    def tick(self, now: float | None = None) -> list[str]:
        """Readmit the pods whose ejection is over and that were scraped fine since; returns
        them."""
        t = self.clock() if now is None else now
        back = []
        for endpoint, ej in list(self.ejected.items()):
            pod = self.registry.get(endpoint)
            if pod is None:
                del self.ejected[endpoint]
                continue
            if self.outliers.is_ejected(endpoint, t):
                continue
            snap = pod.metrics
            if snap.stale or snap.taken_at is None or snap.taken_at <= ej.at:
                continue
            del self.ejected[endpoint]
            self.registry.set_health(endpoint, True)
            log.info("pod %s back in routing (ejection over, scraped fine since)", endpoint)
            back.append(endpoint)
        return back

    def _sync_fleet(self) -> None:
        if self._fleet_version != self.registry.version:
            self._fleet_version = self.registry.version
            self.outliers.set_fleet(p.endpoint for p in self.registry.all())
