"""Pickers: turn weighted totals into a ranked choice (pick first, then fallbacks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scorers.base import ParameterError, PluginEnv, SchedulingContext, check_params


def _ranked_by(totals: Sequence[float], keys: Sequence[float]) -> list[int]:
    return sorted(range(len(totals)), key=lambda i: (-totals[i], keys[i]))


class MaxScorePicker:
    """`max-score-picker`: highest total; ties broken at random; the rest ranked as fallbacks."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("max-score-picker", params, {})
        self.name = name

    def pick(self, ctx: SchedulingContext, totals: Sequence[float]) -> list[int]:
        rnd = ctx.rng.random
        return _ranked_by(totals, [rnd() for _ in totals])


class RandomPicker:
    """`random-picker`: uniform choice, ignoring scores."""

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("random-picker", params, {})
        self.name = name

    def pick(self, ctx: SchedulingContext, totals: Sequence[float]) -> list[int]:
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

    def pick(self, ctx: SchedulingContext, totals: Sequence[float]) -> list[int]:
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

    def pick(self, ctx: SchedulingContext, totals: Sequence[float]) -> list[int]:
        top = max(totals)
        t = self.temperature
        return _sample_order(ctx, [math.exp((x - top) / t) for x in totals])


class RoundRobinPicker:
    """`round-robin-picker` (kvroute): cycle through the candidates in fleet order.

    The baseline every cache-aware policy is measured against; ignores scores.
    """

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("round-robin-picker", params, {})
        self.name = name
        self._next = 0

    def pick(self, ctx: SchedulingContext, totals: Sequence[float]) -> list[int]:
        n = len(totals)
        start = self._next % n
        self._next = start + 1
        return [(start + i) % n for i in range(n)]
