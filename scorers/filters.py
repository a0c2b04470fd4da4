"""Filters: narrow the candidate pods before scoring.

`decode-filter` / `prefill-filter` follow llm-d: decode keeps `decode` and `both` pods, prefill
keeps `prefill` pods. `model-filter` and `healthy-filter` are also run by the scheduler itself
before any profile, so an unknown model and an empty fleet get their own errors (404, 503).
"""

from __future__ import annotations

from typing import Any

from router.pods import Pod, Role
from scorers.base import ParameterError, PluginEnv, SchedulingContext, check_params


class DecodeFilter:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("decode-filter", params, {})
        self.name = name

    def filter(self, ctx: SchedulingContext, pods: list[Pod]) -> list[Pod]:
        return [p for p in pods if p.role is not Role.PREFILL]


class PrefillFilter:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("prefill-filter", params, {})
        self.name = name

    def filter(self, ctx: SchedulingContext, pods: list[Pod]) -> list[Pod]:
        return [p for p in pods if p.role is Role.PREFILL]


class LabelSelectorFilter:
    """`by-label-selector`: keep pods whose labels contain every `matchLabels` pair."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("by-label-selector", params, {"matchLabels": dict})
        self.name = name
        self.match = {str(k): str(v) for k, v in (params.get("matchLabels") or {}).items()}

    def filter(self, ctx: SchedulingContext, pods: list[Pod]) -> list[Pod]:
        items = self.match.items()
        return [p for p in pods if all(p.labels.get(k) == v for k, v in items)]


class ModelFilter:
    """`model-filter`: pods serving the requested model or LoRA adapter."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("model-filter", params, {})
        self.name = name

    def filter(self, ctx: SchedulingContext, pods: list[Pod]) -> list[Pod]:
        model = ctx.request.model
        return [p for p in pods if p.serves(model)]


class HealthyFilter:
    """`healthy-filter`: pods whose health checks and scrapes pass."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("healthy-filter", params, {})
        self.name = name

    def filter(self, ctx: SchedulingContext, pods: list[Pod]) -> list[Pod]:
        return [p for p in pods if p.healthy]


class PrefixCacheAffinityFilter:
    """`prefix-cache-affinity-filter`: when some pods hold at least `threshold` of the prompt,
    keep only those — except with probability `explorationProbability`, so other pods still
    get to build a copy of hot prefixes.
    """

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params(
            "prefix-cache-affinity-filter",
            params,
            {"threshold": float, "explorationProbability": float, "mode": str},
        )
        self.name = name
        self.threshold = float(params.get("threshold", 0.5) or 0.5)
        explore = params.get("explorationProbability")
        self.explore = 0.01 if explore is None else float(explore)
        if not 0.0 <= self.explore <= 1.0 or not 0.0 < self.threshold <= 1.0:
            raise ParameterError("prefix-cache-affinity-filter: threshold in (0,1], p in [0,1]")
        mode = params.get("mode") or "auto"
        self.mode = env.default_prefix_mode if mode == "auto" else mode

    def filter(self, ctx: SchedulingContext, pods: list[Pod]) -> list[Pod]:
        n = len(ctx.keys)
        if n == 0:
            return pods
        hits = ctx.prefix_hits(self.mode)
        if not hits:
            return pods
        need = self.threshold * n
        kept = [p for p in pods if hits.get(p.endpoint, 0.0) >= need]
        if not kept or (self.explore and ctx.rng.random() < self.explore):
            return pods
        return kept
