"""Outlier detection: which pods to take out of routing after the failures faces observed.

Pure policy, Envoy-style (`outlier_detection`): a face reports each exchange's outcome with a
pod (`record_success`, `record_connect_failure`, `record_5xx`) and asks `is_ejected` /
`ejected` before routing. No I/O, no framework; the clock is injected so tests and the
simulator drive it in their own time.

Why not eject on the first 5xx: a 5xx is often caused by the request (a prompt the engine
chokes on), not by the pod. One such request retried over the fleet would otherwise eject
every pod it touched. So a 5xx ejects only after `consecutive_5xx` failures of *different*
requests in a row on that pod (a success resets the streak), and at most
`max_ejection_percent` of the fleet is ejected for 5xx at once (at least one pod may always
be). A refused connection says the pod itself is gone: it ejects after
`consecutive_connect_failures` (default 1) and is not capped.

Ejection lasts `base_ejection_s` times the pod's ejection count (capped at
`max_ejection_s`); the count drops by one for each `base_ejection_s` the pod then stays in
routing without being ejected again, so a pod that keeps failing stays out longer each time
and one that recovered is soon treated as new. `readmit` ends an ejection early (e.g. a
health check passed after a connect failure); `least_recently_ejected` names the pod to try
when every candidate is ejected, rather than failing the request outright.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    SUCCESS = "success"
    CONNECT_FAILURE = "connect_failure"
    HTTP_5XX = "http_5xx"


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    #: 5xx answers to distinct requests in a row that eject a pod.
    consecutive_5xx: int = 5
    #: Refused/reset connections in a row that eject a pod.
    consecutive_connect_failures: int = 1
    #: First ejection's length; the n-th in a row lasts n times this (up to `max_ejection_s`).
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0
    #: Share of the fleet that 5xx ejections may take out at once (at least one pod).
    max_ejection_percent: float = 50.0

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_connect_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"outlier.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.base_ejection_s <= 0:
            raise ValueError(f"outlier.base_ejection_s must be > 0, got {self.base_ejection_s!r}")
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError(
                f"outlier.max_ejection_s ({self.max_ejection_s!r}) must be >= "
                f"outlier.base_ejection_s ({self.base_ejection_s!r})"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(
                "outlier.max_ejection_percent must be between 0 and 100, "
                f"got {self.max_ejection_percent!r}"
            )


@dataclass(frozen=True, slots=True)
class Ejection:
    """One ejection: why, when, until when, and the how-many-th in a row it is."""

    pod: str
    reason: Outcome
    at: float
    until: float
    count: int


@dataclass(slots=True)
class _PodState:
    #: Request ids of the current run of 5xx answers (distinct requests only).
    failed_requests: set[str] = field(default_factory=set)
    connect_failures: int = 0
    #: Ejection multiplier: ejections in a row not yet forgiven.
    count: int = 0
    #: When the multiplier was last lowered or the pod last readmitted.
    calm_since: float = 0.0
    ejection: Ejection | None = None
    #: When the pod was last ejected (kept after readmission; for `least_recently_ejected`).
    last_ejected_at: float = float("-inf")


class OutlierDetector:
    """Per-pod outcome records and the ejections they lead to (see the module docstring).

    Every method takes an optional `now` (seconds on the injected `clock`). Pods are known
    from `set_fleet` and from any outcome recorded for them; the fleet's size bounds 5xx
    ejections (`max_ejection_percent`).
    """

    def __init__(
        self, policy: OutlierPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or OutlierPolicy()
        self.clock = clock
        self._pods: dict[str, _PodState] = {}

    # ------------------------------------------------------------------ fleet
    def set_fleet(self, pods: Iterable[str]) -> None:
        """The pods that exist now: new ones are added, the others forgotten."""
        wanted = set(pods)
        for pod in [p for p in self._pods if p not in wanted]:
            del self._pods[pod]
        for pod in wanted:
            self._pods.setdefault(pod, _PodState())

    def forget(self, pod: str) -> None:
        self._pods.pop(pod, None)

    # ------------------------------------------------------------------ outcomes
    def record(
        self, pod: str, outcome: Outcome, request_id: str | None = None, now: float | None = None
    ) -> Ejection | None:
        """Record one exchange's outcome; returns the ejection it caused, if any."""
        if outcome is Outcome.SUCCESS:
            self.record_success(pod, now)
            return None
        if outcome is Outcome.CONNECT_FAILURE:
            return self.record_connect_failure(pod, now)
        if request_id is None:
            raise ValueError("a 5xx outcome needs the request id (5xx count per request)")
        return self.record_5xx(pod, request_id, now)

    def record_success(self, pod: str, now: float | None = None) -> None:
        st = self._state(pod)
        st.failed_requests.clear()
        st.connect_failures = 0
        self._forgive(st, self._now(now))

    def record_connect_failure(self, pod: str, now: float | None = None) -> Ejection | None:
        t = self._now(now)
        st = self._state(pod)
        st.connect_failures += 1
        if st.connect_failures < self.policy.consecutive_connect_failures:
            return None
        if self._current(st, t) is not None:
            return None
        return self._eject(pod, st, Outcome.CONNECT_FAILURE, t)

    def record_5xx(self, pod: str, request_id: str, now: float | None = None) -> Ejection | None:
        """A 5xx for `request_id`; the same request failing again on this pod is not counted
        twice (the streak counts requests, not answers)."""
        t = self._now(now)
        st = self._state(pod)
        st.failed_requests.add(request_id)
        if len(st.failed_requests) < self.policy.consecutive_5xx:
            return None
        if self._current(st, t) is not None:
            return None
        if len(self._ejected_for_5xx(t)) >= self._max_5xx_ejections():
            return None  # the streak stays: the pod is ejected once room frees up
        return self._eject(pod, st, Outcome.HTTP_5XX, t)

    # ------------------------------------------------------------------ queries
    def is_ejected(self, pod: str, now: float | None = None) -> bool:
        st = self._pods.get(pod)
        return st is not None and self._current(st, self._now(now)) is not None

    def ejected(self, now: float | None = None) -> frozenset[str]:
        t = self._now(now)
        return frozenset(p for p, st in self._pods.items() if self._current(st, t) is not None)

    def ejection(self, pod: str, now: float | None = None) -> Ejection | None:
        """The pod's current ejection (None when it is in routing)."""
        st = self._pods.get(pod)
        return None if st is None else self._current(st, self._now(now))

    def least_recently_ejected(
        self, candidates: Collection[str] | None = None, now: float | None = None
    ) -> str | None:
        """Among the ejected `candidates` (default: all pods), the one ejected longest ago:
        the pod to try when every candidate is out, rather than answering 503."""
        t = self._now(now)
        pool = self._pods if candidates is None else [p for p in candidates if p in self._pods]
        out = [p for p in pool if self._current(self._pods[p], t) is not None]
        if not out:
            return None
        return min(out, key=lambda p: (self._pods[p].last_ejected_at, p))

    def readmit(self, pod: str, now: float | None = None) -> bool:
        """End the pod's ejection now (its streaks start over; the multiplier stays until
        the pod has been calm for a while). True if it was ejected."""
        st = self._pods.get(pod)
        t = self._now(now)
        if st is None or self._current(st, t) is None:
            return False
        self._end(st, t)
        return True

    # ------------------------------------------------------------------ internals
    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def _state(self, pod: str) -> _PodState:
        st = self._pods.get(pod)
        if st is None:
            st = self._pods[pod] = _PodState()
        return st

    def _current(self, st: _PodState, t: float) -> Ejection | None:
        ej = st.ejection
        if ej is not None and t >= ej.until:
            self._end(st, ej.until)
            return None
        return ej

    def _end(self, st: _PodState, at: float) -> None:
        st.ejection = None
        st.failed_requests.clear()
        st.connect_failures = 0
        st.calm_since = at

    def _forgive(self, st: _PodState, t: float) -> None:
        """Lower the multiplier once per `base_ejection_s` spent in routing."""
        if st.count == 0 or self._current(st, t) is not None:
            return
        steps = int((t - st.calm_since) // self.policy.base_ejection_s)
        if steps > 0:
            st.count = max(0, st.count - steps)
            st.calm_since += steps * self.policy.base_ejection_s

    def _ejected_for_5xx(self, t: float) -> list[str]:
        return [
            p
            for p, st in self._pods.items()
            if (ej := self._current(st, t)) is not None and ej.reason is Outcome.HTTP_5XX
        ]

    def _max_5xx_ejections(self) -> int:
        return max(1, int(len(self._pods) * self.policy.max_ejection_percent / 100))

    def _eject(self, pod: str, st: _PodState, reason: Outcome, t: float) -> Ejection:
        self._forgive(st, t)
        st.count += 1
        length = min(self.policy.base_ejection_s * st.count, self.policy.max_ejection_s)
        st.ejection = Ejection(pod, reason, t, t + length, st.count)
        st.last_ejected_at = t
        return st.ejection
