"""`load-aware-scorer`: waiting requests against a threshold, as llm-d's scorer.

Score = 1 − min(waiting, threshold) / threshold: an idle pod scores 1, a pod whose queue reached
the threshold scores 0. Absolute rather than relative, so an all-idle fleet keeps full scores
and an all-saturated one gets none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import ParameterError, PluginEnv, SchedulingContext, check_params


class LoadAwareScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("load-aware-scorer", params, {"threshold": int})
        self.name = name
        self.threshold = params.get("threshold") or 128
        if self.threshold <= 0:
            raise ParameterError("load-aware-scorer threshold must be > 0")

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        t = self.threshold
        return [1.0 - min(p.metrics.waiting, t) / t for p in pods]
