"""`vllm-kv-aware`: vllm-project/router's `kv_aware` policy (alias `precise_cache_aware`).

A whole decision procedure: the scorer gives the pod it picks 1.0 and every other pod 0.0
(use it with weight 1 and `max-score-picker`). Learns only through `on_pick`.

The procedure (vllm-project/router `src/policies/kv_aware.rs`, `src/kv_index/`,
`docs/kv_aware.md`):

1. One candidate: it, without scoring (and without a speculative insert).
2. The prompt's chained block keys (kvroute's `blocks:` config: tokenize, blocks of
   `block_size` tokens, seeded hash; vllm-router's `--block-size` / hash seed must match vLLM
   the same way). No full block: the least-loaded pod.
3. Per pod, the number of contiguous leading blocks it holds in the KV-event (precise) index
   or, for up to `speculative_ttl_secs`, speculatively. The pod with the most wins; among
   equals the LAST candidate (Rust's `max_by_key` keeps the last maximum). If the best is 0:
   the least-loaded pod (the first among equals, `min_by_key`). No load term otherwise.
4. After routing, the blocks past the best match (``keys[best:]``) are recorded for the
   chosen pod as speculative entries that expire after `speculative_ttl_secs`, so a burst
   of requests sharing a prefix sees the first one's blocks before vLLM's events arrive.

Load = the router's own requests in flight (`Pod.inflight_requests`), as vllm-router's
`worker.load()`.

Parameters (vllm-router's `KvAwareConfig`): ``enable_speculative`` (true),
``speculative_ttl_secs`` (2.0; `speculative_ttl`). `block_size` and `hash_seed` are the router
config's `blocks.block_size` and `blocks.seed`.

Where kvroute differs: the speculative entries live in this plugin (a small per-pod map of
key → expiry), not in the shared index; a hit held in a CPU/disk tier counts with the index's
tier weight (vllm-router's index has no tiers, so with GPU-only events this is the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.index import BlockIndex
from router.pods import Pod
from router.request import RoutingRequest
from scorers.base import (
    DetailedScorer,
    LearningPlugin,
    ParameterError,
    PluginEnv,
    SchedulingContext,
    check_params,
)

if TYPE_CHECKING:
    from router.scheduler import Decision


class SpeculativeBlocks:
    """Per pod: block key → expiry time. Entries of one pod expire in insertion order (one
    TTL, a monotonic clock), so purging pops from the front."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._pods: dict[str, dict[int, float]] = {}

    def add(self, pod: str, keys: Sequence[int], now: float) -> None:
        entries = self._pods.setdefault(pod, {})
        expires = now + self.ttl_s
        for k in keys:
            entries.pop(k, None)  # re-adding moves the key to the back
            entries[k] = expires

    def holds(self, pod: str, key: int, now: float) -> bool:
        exp = self._pods.get(pod, {}).get(key)
        return exp is not None and exp >= now  # vllm-router: expired once elapsed > ttl

    def purge(self, now: float) -> None:
        for pod in list(self._pods):
            entries = self._pods[pod]
            stale = []
            for k, exp in entries.items():
                if exp >= now:
                    break
                stale.append(k)
            for k in stale:
                del entries[k]
            if not entries:
                del self._pods[pod]

    def pods(self) -> set[str]:
        return set(self._pods)

    def count(self, pod: str) -> int:
        return len(self._pods.get(pod, {}))

    def drop_pod(self, pod: str) -> None:
        self._pods.pop(pod, None)


@dataclass(slots=True)
class _Pending:
    request: RoutingRequest
    #: First block past the best match (the speculative insert starts here), or None.
    start: int | None


class VllmKvAwareScorer(DetailedScorer, LearningPlugin):
    _MAX_PENDING = 4096

    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params(
            "vllm-kv-aware",
            params,
            {"enable_speculative": bool, "speculative_ttl_secs": float},
        )
        self.name = name
        #: Read by the scheduler: requests need block keys, the engines' events feed us.
        self.mode = "precise"
        self.index: BlockIndex = env.indexes["precise"]
        spec = params.get("enable_speculative")
        self.enable_speculative = True if spec is None else bool(spec)
        ttl = params.get("speculative_ttl_secs")
        ttl = 2.0 if ttl is None else float(ttl)
        if ttl <= 0:
            raise ParameterError("vllm-kv-aware speculative_ttl_secs must be > 0")
        self.speculative = SpeculativeBlocks(ttl)
        self._pending: dict[int, _Pending] = {}
        env.registry.on_remove(self.speculative.drop_pod)

    def matched_blocks(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[int]:
        """Contiguous leading blocks per pod, real (KV events) or speculative (unexpired)."""
        keys = ctx.keys
        n = len(keys)
        real = ctx.prefix_hits("precise")
        now = ctx.now
        spec = self.speculative
        spec_pods = spec.pods()
        out = []
        for p in pods:
            ep = p.endpoint
            i = int(real.get(ep, 0.0))
            if ep in spec_pods:
                while i < n:
                    k = keys[i]
                    if spec.holds(ep, k, now) or any(h == ep for h, _ in self.index.holders(k)):
                        i += 1
                    else:
                        break
            out.append(i)
        return out

    def score_details(
        self, ctx: SchedulingContext, pods: Sequence[Pod]
    ) -> tuple[list[float], list[dict[str, float]]]:
        """The scores and, per pod, its matched blocks and load (for `explain`)."""
        if not pods:
            return [], []
        idx, start, matched = self.choose(ctx, pods)
        req = ctx.request
        if len(self._pending) >= self._MAX_PENDING:
            self._pending.clear()  # schedules never committed (dry runs)
        self._pending[id(req)] = _Pending(req, start)
        out = [0.0] * len(pods)
        out[idx] = 1.0
        details = [
            {"matched_blocks": float(m), "inflight_requests": float(p.inflight_requests)}
            for m, p in zip(matched, pods, strict=True)
        ]
        return out, details

    def choose(
        self, ctx: SchedulingContext, pods: Sequence[Pod]
    ) -> tuple[int, int | None, list[int]]:
        """(index of the chosen pod, first block to insert speculatively or None, matched
        blocks per pod)."""
        if len(pods) == 1:
            return 0, None, [0]
        n = len(ctx.keys)
        if n == 0:
            return _first_least_loaded(pods), None, [0] * len(pods)
        self.speculative.purge(ctx.now)
        matched = self.matched_blocks(ctx, pods)
        best_idx = 0
        for i, m in enumerate(matched):
            if m >= matched[best_idx]:  # >=: the last maximum, as Rust's max_by_key
                best_idx = i
        best = matched[best_idx]
        chosen = best_idx if best > 0 else _first_least_loaded(pods)
        start = best if self.enable_speculative and best < n else None
        return chosen, start, matched

    def on_pick(self, decision: Decision, now: float) -> None:
        req = decision.request
        pending = self._pending.pop(id(req), None)
        if pending is None or pending.request is not req or pending.start is None:
            return
        keys = req.block_keys or []
        self.speculative.add(decision.target, keys[pending.start :], now)


def _first_least_loaded(pods: Sequence[Pod]) -> int:
    best = 0
    for i, p in enumerate(pods):
        if p.inflight_requests < pods[best].inflight_requests:
            best = i
    return best
