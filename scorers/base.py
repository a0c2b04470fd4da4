"""Plugin interfaces: filters, scorers, pickers, and the per-request context they share.

Each plugin kind is a small Protocol with one method, in the shape of llm-d's scheduler
framework. Scorers decide their own normalization: every score is in [0, 1], and a scorer that
cannot tell candidates apart gives them all 0.0 rather than a full score, so it adds nothing to
any pod's total (which matters for the weighted-random and softmax pickers).

A plugin that learns from its own decisions implements the optional hooks of `LearningPlugin`;
the scheduler calls them from `on_pick` / `on_first_token` / `on_complete` / `on_failure`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from router.index import BlockIndex
from router.pods import Pod, PodRegistry
from router.request import RoutingRequest

if TYPE_CHECKING:
    from router.scheduler import Decision


@dataclass(slots=True)
class SchedulingContext:
    """What one scheduling cycle knows about its request; built once, read by every plugin."""

    request: RoutingRequest
    now: float
    keys: list[int]
    #: Prompt tokens (exact in token mode, estimated in character mode).
    prompt_tokens: int
    #: Tokens one block stands for (block_size, or an estimate in character mode).
    tokens_per_block: int
    rng: random.Random
    _lookup: Callable[[str], dict[str, float]]
    _hits: dict[str, dict[str, float]] = field(default_factory=dict)

    def prefix_hits(self, mode: str) -> dict[str, float]:
        """Pod → matched leading blocks (tier-weighted) in the `mode` index; one lookup a cycle."""
        hits = self._hits.get(mode)
        if hits is None:
            hits = self._hits[mode] = self._lookup(mode)
        return hits

    def uncached_tokens(self, endpoint: str, mode: str) -> int:
        """Prompt tokens the pod would have to prefill, given the blocks it holds."""
        matched = self.prefix_hits(mode).get(endpoint, 0.0)
        return max(0, self.prompt_tokens - int(matched * self.tokens_per_block))


@dataclass(slots=True)
class PluginEnv:
    """What a plugin may read besides the request: built by the scheduler, shared by plugins."""

    registry: PodRegistry
    #: Index mode ("precise" or "approximate") used where a plugin has no mode of its own.
    default_prefix_mode: str
    indexes: dict[str, BlockIndex]


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(self, ctx: SchedulingContext, pods: list[Pod]) -> list[Pod]: ...


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        """One score in [0, 1] per pod, in the order of `pods`."""
        ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(
        self, ctx: SchedulingContext, pods: Sequence[Pod], totals: Sequence[float]
    ) -> list[int]:
        """Indices into `pods`, best first: [pick, fallback, fallback, ...]."""
        ...


class LearningPlugin:
    """Optional hooks for plugins that learn from the scheduler's own decisions."""

    def on_pick(self, decision: Decision, now: float) -> None:
        return None

    def on_first_token(self, decision: Decision, now: float) -> None:
        return None

    def on_complete(self, decision: Decision, usage: dict[str, Any] | None, now: float) -> None:
        return None

    def on_failure(self, decision: Decision, endpoint: str, now: float) -> None:
        return None


class DetailedScorer:
    """Base for scorers whose `score_details(ctx, pods)` returns (scores, one dict of named
    figures per pod) for `explain` and the debug header: `score` is its first half."""

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        return self.score_details(ctx, pods)[0]  # type: ignore[attr-defined]


def min_max_lower_is_better(values: Sequence[float]) -> list[float]:
    """(max - v) / (max - min): the lowest value scores 1, the highest 0; all equal → all 0."""
    lo = min(values)
    hi = max(values)
    if hi == lo:
        return [0.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


class ParameterError(ValueError):
    """A plugin parameter is missing, unknown or of the wrong type."""


def check_params(plugin_type: str, params: dict[str, Any], allowed: dict[str, type]) -> None:
    """Reject unknown parameters and wrong types, naming the plugin and the parameter."""
    for key, value in params.items():
        if key not in allowed:
            raise ParameterError(
                f"plugin '{plugin_type}' has no parameter '{key}' (known: {sorted(allowed)})"
            )
        want = allowed[key]
        ok = (
            isinstance(value, want)
            or (want is float and isinstance(value, int) and not isinstance(value, bool))
            or value is None
        )
        if not ok or (want in (int, float) and isinstance(value, bool)):
            raise ParameterError(
                f"plugin '{plugin_type}' parameter '{key}' must be {want.__name__}, "
                f"got {type(value).__name__}"
            )
