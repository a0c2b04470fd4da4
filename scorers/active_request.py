"""`active-request-scorer`: fewer requests the router itself has in flight on the pod is better.

Unlike scraped queue depth this reacts within the same scheduling burst: the count moves on
every pick and completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import PluginEnv, SchedulingContext, check_params, min_max_lower_is_better


class ActiveRequestScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("active-request-scorer", params, {})
        self.name = name

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        return min_max_lower_is_better([p.inflight_requests for p in pods])
