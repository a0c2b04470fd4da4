"""`dynamo-kv-cost`: NVIDIA Dynamo's KV-router cost, re-implemented.

A whole decision procedure: the scorer gives the pod it picks 1.0 and every other pod 0.0
(use it with weight 1 and `max-score-picker`). `costs()` returns each pod's cost and its parts
for tests and debugging.

Per pod, in blocks, lower is better (ai-dynamo/dynamo `lib/kv-router/src/scheduling/selector/
default.rs` `worker_logit`, defaults from `scheduling/config.rs`)::

    credit  = overlap_score_credit * device_blocks
            + host_cache_hit_weight * host_blocks + disk_cache_hit_weight * disk_blocks
    prefill = max(0, (active_prefill_tokens + ISL) / block_size - credit)
    decode  = active blocks of the pod's live requests + this request's blocks not among them
    cost    = prefill_load_scale * prefill + decode + decode_active_request_weight * requests

`device_blocks` is the request's contiguous leading blocks the pod holds on GPU;
`host_blocks` is how far the match reaches counting CPU blocks too, minus `device_blocks`;
`disk_blocks` how far it reaches counting every tier, minus both (Dynamo's tiered overlap).
`active_prefill_tokens` is the router's own count of uncached prompt tokens sent to the pod and
not yet prefilled (`Pod.inflight_prefill_tokens`, released at first token); the active blocks
are tracked here from the scheduler's hooks (a request's prompt blocks count from its pick to
its completion or failure). Both move instantly, as Dynamo's router-side tracking.

Selection: `router_temperature` 0 = the lowest cost, exact ties at random; T > 0 = sample with
probability ∝ exp(-(cost - min) / ((max - min) * T)) (Dynamo's softmin over range-normalised
costs; all equal = uniform).

Parameters (Dynamo's names and defaults): ``overlap_score_credit`` (1.0),
``prefill_load_scale`` (1.0; older Dynamo called this weight ``overlap_score_weight``, accepted
as an alias), ``host_cache_hit_weight`` (0.75), ``disk_cache_hit_weight`` (0.25),
``decode_active_request_weight`` (0.0), ``router_temperature`` (0.0). ``mode`` (kvroute):
``precise`` (default; Dynamo with KV events) or ``approximate`` (Dynamo without KV events
predicts the cache from its own picks; set the config's `prefix_index.ttl_s` to 120 for its
lifetime). `block_size` is the router config's block size (Dynamo's `kv_block_size`).

Where kvroute differs: a request's blocks are its full blocks (no partial last block); Dynamo's
later refinements (overlap credit decay, shared-cache multiplier, replica sync) stay at their
default, i.e. off.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.index import BlockIndex, Tier
from router.pods import Pod
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

MODES = ("precise", "approximate")


@dataclass(frozen=True, slots=True)
class WorkerCost:
    endpoint: str
    device_blocks: int
    host_blocks: int
    disk_blocks: int
    prefill_blocks: float
    decode_blocks: int
    cost: float


def tier_overlaps(index: BlockIndex, keys: Sequence[int]) -> dict[str, tuple[int, int, int]]:
    """Pod → (device, host, disk) overlap blocks of `keys`, as Dynamo splits them."""
    # pod → [device len, host len (GPU or CPU), any-tier len, device alive, host alive]
    state: dict[str, list[Any]] = {}
    alive: set[str] | None = None
    for i, key in enumerate(keys):
        held = dict(index.holders(key))
        if alive is None:
            alive = set(held)
            for pod in alive:
                state[pod] = [0, 0, 0, True, True]
        for pod in list(alive):
            tier = held.get(pod)
            if tier is None:
                alive.discard(pod)
                continue
            st = state[pod]
            st[2] = i + 1
            if st[4] and tier <= Tier.CPU:
                st[1] = i + 1
            else:
                st[4] = False
            if st[3] and tier == Tier.GPU:
                st[0] = i + 1
            else:
                st[3] = False
        if not alive:
            break
    return {
        pod: (dev, host - dev, anyt - max(dev, host))
        for pod, (dev, host, anyt, _, _) in state.items()
    }


class DynamoKvCostScorer(DetailedScorer, LearningPlugin):
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params(
            "dynamo-kv-cost",
            params,
            {
                "overlap_score_credit": float,
                "prefill_load_scale": float,
                "overlap_score_weight": float,
                "host_cache_hit_weight": float,
                "disk_cache_hit_weight": float,
                "decode_active_request_weight": float,
                "router_temperature": float,
                "mode": str,
            },
        )
        if params.get("overlap_score_weight") is not None and (
            params.get("prefill_load_scale") is not None
        ):
            raise ParameterError(
                "dynamo-kv-cost: give prefill_load_scale or its older name "
                "overlap_score_weight, not both"
            )

        def get(key: str, default: float) -> float:
            v = params.get(key)
            value = default if v is None else float(v)
            if not math.isfinite(value) or value < 0:
                raise ParameterError(f"dynamo-kv-cost {key} must be a finite number >= 0")
            return value

        self.name = name
        self.overlap_score_credit = get("overlap_score_credit", 1.0)
        self.prefill_load_scale = get("prefill_load_scale", get("overlap_score_weight", 1.0))
        self.host_cache_hit_weight = get("host_cache_hit_weight", 0.75)
        self.disk_cache_hit_weight = get("disk_cache_hit_weight", 0.25)
        self.decode_active_request_weight = get("decode_active_request_weight", 0.0)
        self.router_temperature = get("router_temperature", 0.0)
        mode = params.get("mode") or "precise"
        if mode not in MODES:
            raise ParameterError(f"dynamo-kv-cost mode must be one of {MODES}, got {mode!r}")
        #: Read by the scheduler: which index must be fed and that requests need keys.
        self.mode = mode
        self.index: BlockIndex = env.indexes[mode]
        #: Pod → block key → live requests holding it (their prompt blocks).
        self.active: dict[str, Counter[int]] = {}
        self._live: dict[int, tuple[Decision, str, list[int]]] = {}
        env.registry.on_remove(lambda ep: self.active.pop(ep, None))

    # -- the cost --------------------------------------------------------------------
    def costs(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[WorkerCost]:
        keys = ctx.keys
        bs = max(1, ctx.tokens_per_block)
        isl = ctx.prompt_tokens
        overlaps = tier_overlaps(self.index, keys) if keys else {}
        distinct = set(keys)
        out = []
        for p in pods:
            dev, host, disk = overlaps.get(p.endpoint, (0, 0, 0))
            credit = (
                self.overlap_score_credit * dev
                + self.host_cache_hit_weight * host
                + self.disk_cache_hit_weight * disk
            )
            prefill = max(0.0, (p.inflight_prefill_tokens + isl) / bs - credit)
            active = self.active.get(p.endpoint)
            if active:
                decode = len(active) + sum(1 for k in distinct if k not in active)
            else:
                decode = len(distinct)
            cost = (
                self.prefill_load_scale * prefill
                + decode
                + self.decode_active_request_weight * p.inflight_requests
            )
            out.append(WorkerCost(p.endpoint, dev, host, disk, prefill, decode, cost))
        return out

    def pick(self, ctx: SchedulingContext, costs: Sequence[float]) -> int:
        """Index of the chosen pod given its costs (argmin or softmin, see the docstring)."""
        lo, hi = min(costs), max(costs)
        if self.router_temperature <= 0:
            ties = [i for i, c in enumerate(costs) if c == lo]
            return ties[0] if len(ties) == 1 else ties[ctx.rng.randrange(len(ties))]
        if hi == lo:
            return ctx.rng.randrange(len(costs))
        scale = (hi - lo) * self.router_temperature
        weights = [math.exp(-(c - lo) / scale) for c in costs]
        u = ctx.rng.random() * sum(weights)
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if u <= acc:
                return i
        return len(costs) - 1

    def score_details(
        self, ctx: SchedulingContext, pods: Sequence[Pod]
    ) -> tuple[list[float], list[dict[str, float]]]:
        """The scores and, per pod, its cost and the cost's parts (for `explain`)."""
        if not pods:
            return [], []
        costs = self.costs(ctx, pods)
        idx = self.pick(ctx, [c.cost for c in costs])
        out = [0.0] * len(pods)
        out[idx] = 1.0
        details = [
            {
                "cost": c.cost,
                "prefill_blocks": c.prefill_blocks,
                "decode_blocks": float(c.decode_blocks),
                "device_blocks": float(c.device_blocks),
                "host_blocks": float(c.host_blocks),
                "disk_blocks": float(c.disk_blocks),
            }
            for c in costs
        ]
        return out, details

    # -- active-block tracking -------------------------------------------------------
    def on_pick(self, decision: Decision, now: float) -> None:
        keys = list(dict.fromkeys(decision.request.block_keys or ()))
        ep = decision.target
        self.active.setdefault(ep, Counter()).update(keys)
        self._live[id(decision)] = (decision, ep, keys)

    def on_complete(self, decision: Decision, usage: dict[str, Any] | None, now: float) -> None:
        self._release(decision)

    def on_failure(self, decision: Decision, endpoint: str, now: float) -> None:
        self._release(decision)

    def _release(self, decision: Decision) -> None:
        entry = self._live.pop(id(decision), None)
        if entry is None or entry[0] is not decision:
            return
        _, ep, keys = entry
        active = self.active.get(ep)
        if active is None:
            return
        active.subtract(keys)
        for k in keys:
            if active[k] <= 0:
                del active[k]
        if not active:
            del self.active[ep]
