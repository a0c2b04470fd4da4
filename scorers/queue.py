"""`queue-scorer`: fewer waiting requests (from the pod's scraped metrics) is better."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import PluginEnv, SchedulingContext, check_params, min_max_lower_is_better


class QueueScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("queue-scorer", params, {})
        self.name = name

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        return min_max_lower_is_better([p.metrics.waiting for p in pods])
