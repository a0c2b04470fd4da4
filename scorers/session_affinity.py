"""`session-affinity-scorer`: the pod that served this session last scores 1, others 0.

Learns only from the scheduler's hooks: a pick records session → pod; a failure on that pod
forgets it. The map is an LRU bounded by `maxSessions`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from router.pods import Pod
from scorers.base import LearningPlugin, PluginEnv, SchedulingContext, check_params

if TYPE_CHECKING:
    from router.scheduler import Decision


class SessionAffinityScorer(LearningPlugin):
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("session-affinity-scorer", params, {"maxSessions": int})
        self.name = name
        self.max_sessions = params.get("maxSessions") or 100_000
        self._last: OrderedDict[str, str] = OrderedDict()

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        key = ctx.request.session_key
        last = self._last.get(key) if key else None
        if last is None:
            return [0.0] * len(pods)
        return [1.0 if p.endpoint == last else 0.0 for p in pods]

    def on_pick(self, decision: Decision, now: float) -> None:
        key = decision.request.session_key
        if not key:
            return
        self._last[key] = decision.target
        self._last.move_to_end(key)
        if len(self._last) > self.max_sessions:
            self._last.popitem(last=False)

    def on_failure(self, decision: Decision, endpoint: str, now: float) -> None:
        key = decision.request.session_key
        if key and self._last.get(key) == endpoint:
            del self._last[key]
