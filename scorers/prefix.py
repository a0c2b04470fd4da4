"""`prefix-cache-scorer`: how much of the request's prompt a pod already holds.

Score = the pod's consecutive leading blocks of the request (tier-weighted) / the request's
blocks. Mode `precise` reads the index fed by vLLM KV events; `approximate` reads the index the
scheduler fills from its own picks (llm-d's default prefix scorer). `auto` takes the scheduler's
default (precise when KV events are configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import ParameterError, PluginEnv, SchedulingContext, check_params

MODES = ("auto", "precise", "approximate")


class PrefixCacheScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("prefix-cache-scorer", params, {"mode": str, "maxPrefixBlocksToMatch": int})
        mode = params.get("mode") or "auto"
        if mode not in MODES:
            raise ParameterError(f"prefix-cache-scorer mode must be one of {MODES}, got {mode!r}")
        self.name = name
        self.mode = env.default_prefix_mode if mode == "auto" else mode
        self.max_blocks = params.get("maxPrefixBlocksToMatch")

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        n = len(ctx.keys)
        if self.max_blocks is not None:
            n = min(n, self.max_blocks)
        if n == 0:
            return [0.0] * len(pods)
        hits = ctx.prefix_hits(self.mode)
        if not hits:
            return [0.0] * len(pods)
        return [min(hits.get(p.endpoint, 0.0), n) / n for p in pods]


class PrecisePrefixCacheScorer(PrefixCacheScorer):
    """llm-d's `precise-prefix-cache-scorer`: the prefix scorer reading the KV-event index."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        super().__init__(name, {"mode": "precise", **params}, env)
