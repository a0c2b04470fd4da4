"""`kv-cache-utilization-scorer`: 1 − the pod's KV-cache utilization (scraped)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import PluginEnv, SchedulingContext, check_params


class KVCacheUtilizationScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("kv-cache-utilization-scorer", params, {})
        self.name = name

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        return [min(1.0, max(0.0, 1.0 - p.metrics.kv_utilization)) for p in pods]
