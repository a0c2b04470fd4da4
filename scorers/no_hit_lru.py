"""`no-hit-lru-scorer`: spread cold requests over the pods picked least recently.

A request with no cached prefix anywhere builds a new prefix wherever it lands; sending such
requests to the least-recently-picked pod spreads new prefixes over the fleet instead of piling
them where load is momentarily lowest. Warm requests score every pod 0 (no opinion).
Score = rank by last pick time: the oldest scores 1, the newest 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import PluginEnv, SchedulingContext, check_params


class NoHitLRUScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("no-hit-lru-scorer", params, {})
        self.name = name
        self.mode = env.default_prefix_mode

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        n = len(pods)
        if n < 2 or ctx.prefix_hits(self.mode):
            return [0.0] * n
        order = sorted(range(n), key=lambda i: pods[i].last_picked_at)
        out = [0.0] * n
        for rank, i in enumerate(order):
            out[i] = 1.0 - rank / (n - 1)
        return out
