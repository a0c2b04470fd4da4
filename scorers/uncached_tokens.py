"""`uncached-tokens-load-scorer` (kvroute's own): pending prefill work on each pod, in tokens.

For each pod: the uncached prompt tokens the router has already sent there and not yet seen
prefilled, plus this request's tokens that the pod does not hold. Prefill time is roughly linear
in tokens to compute, so this predicts time to first token far better than request counts: ten
queued requests that hit the cache cost less than one cold 30k-token prompt.
Score = min-max normalized, least pending work = 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import (
    ParameterError,
    PluginEnv,
    SchedulingContext,
    check_params,
    min_max_lower_is_better,
)


class UncachedTokensLoadScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("uncached-tokens-load-scorer", params, {"mode": str})
        self.name = name
        mode = params.get("mode") or "auto"
        if mode not in ("auto", "precise", "approximate"):
            raise ParameterError(f"uncached-tokens-load-scorer mode {mode!r} is unknown")
        self.mode = env.default_prefix_mode if mode == "auto" else mode

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        mode = self.mode
        return min_max_lower_is_better(
            [p.inflight_prefill_tokens + ctx.uncached_tokens(p.endpoint, mode) for p in pods]
        )
