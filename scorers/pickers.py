"""Pickers: turn weighted totals into a ranked choice (pick first, then fallbacks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import ParameterError, PluginEnv, SchedulingContext, check_params


def _ranked_by(totals: Sequence[float], keys: Sequence[float]) -> list[int]:
    return sorted(range(len(totals)), key=lambda i: (-totals[i], keys[i]))


class MaxScorePicker:
    """`max-score-picker`: highest total; ties broken at random; the rest ranked as fallbacks."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("max-score-picker", params, {})
        self.name = name

    def pick(
        self, ctx: SchedulingContext, pods: Sequence[Pod], totals: Sequence[float]
    ) -> list[int]:
        rnd = ctx.rng.random
        return _ranked_by(totals, [rnd() for _ in totals])


class RandomPicker:
    """`random-picker`: uniform choice, ignoring scores."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("random-picker", params, {})
        self.name = name

    def pick(
        self, ctx: SchedulingContext, pods: Sequence[Pod], totals: Sequence[float]
    ) -> list[int]:
        order = list(range(len(totals)))
        ctx.rng.shuffle(order)
        return order


def _sample_order(ctx: SchedulingContext, weights: list[float]) -> list[int]:
    """Weighted sampling without replacement (Efraimidis–Spirakis keys)."""
    rnd = ctx.rng.random
    keys = []
    for i, w in enumerate(weights):
        u = rnd()
        keys.append((math.log(u) / w if w > 0 and u > 0 else -math.inf, i))
    keys.sort(reverse=True)
    return [i for _, i in keys]


class WeightedRandomPicker:
    """`weighted-random-picker`: choose with probability proportional to the total."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("weighted-random-picker", params, {})
        self.name = name

    def pick(
        self, ctx: SchedulingContext, pods: Sequence[Pod], totals: Sequence[float]
    ) -> list[int]:
        weights = [max(0.0, t) for t in totals]
        if not any(weights):
            weights = [1.0] * len(totals)
        return _sample_order(ctx, weights)


class SoftmaxPicker:
    """`softmax-picker`: choose with probability ∝ exp(total / temperature)."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("softmax-picker", params, {"temperature": float})
        self.name = name
        t = params.get("temperature")
        self.temperature = 0.1 if t is None else float(t)
        if self.temperature <= 0:
            raise ParameterError("softmax-picker temperature must be > 0")

    def pick(
        self, ctx: SchedulingContext, pods: Sequence[Pod], totals: Sequence[float]
    ) -> list[int]:
        top = max(totals)
        t = self.temperature
        return _sample_order(ctx, [math.exp((x - top) / t) for x in totals])


class RoundRobinPicker:
    """`round-robin-picker` (kvroute): take the candidates in turn, by endpoint order.

    Remembers, per candidate set, the last endpoint it picked and takes the next one after it;
    so the decode and prefill profiles of a P/D handler can share one picker without
    disturbing each other's turn, and a set it has not seen (a pod left or came back)
    continues after the last endpoint picked from any set. The baseline cache-aware policies
    are measured against; ignores scores.
    """

    _MAX_SETS = 64

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("round-robin-picker", params, {})
        self.name = name
        self._last: dict[frozenset[str], str] = {}
        self._last_any: str | None = None

    def pick(
        self, ctx: SchedulingContext, pods: Sequence[Pod], totals: Sequence[float]
    ) -> list[int]:
        order = sorted(range(len(pods)), key=lambda i: pods[i].endpoint)
        group = frozenset(p.endpoint for p in pods)
        last = self._last.get(group, self._last_any)
        start = 0
        if last is not None:
            start = next((k for k, i in enumerate(order) if pods[i].endpoint > last), 0)
        ranked = order[start:] + order[:start]
        if len(self._last) >= self._MAX_SETS and group not in self._last:
            self._last.clear()
        self._last[group] = self._last_any = pods[ranked[0]].endpoint
        return ranked
