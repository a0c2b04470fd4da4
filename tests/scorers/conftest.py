"""Helpers for the peer-policy plugin tests: a real Scheduler over a small static fleet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import yaml

from router.config import parse_config
from router.index import BlockIndex
from router.pods import Pod
from router.request import RoutingRequest
from router.scheduler import Scheduler
from scorers.base import SchedulingContext

ENDPOINTS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


def scheduler_with(
    plugin_type: str,
    params: dict[str, Any] | None = None,
    pods: Sequence[str] = ENDPOINTS,
    *,
    clock: Callable[[], float] = lambda: 0.0,
    seed: int = 1,
    chars_per_block: int = 64,
    pending: bool = True,
) -> Scheduler:
    """A scheduler whose one profile is `plugin_type` (weight 1) + max-score-picker.

    `pending=False` turns off the scheduler's pending entries in the precise index, as the
    peers' policy configs do (vllm-router keeps its own speculative state, Dynamo none).
    """
    plugin: dict[str, Any] = {"type": plugin_type}
    if params:
        plugin["parameters"] = params
    doc = {
        "seed": seed,
        "blocks": {"mode": "chars", "chars_per_block": chars_per_block},
        "pods": [{"endpoint": ep, "models": ["m"]} for ep in pods],
        "plugins": [plugin, {"type": "max-score-picker"}],
        "schedulingProfiles": [
            {
                "name": "default",
                "plugins": [
                    {"pluginRef": plugin_type, "weight": 1},
                    {"pluginRef": "max-score-picker"},
                ],
            }
        ],
    }
    if not pending:
        doc["prefix_index"] = {"pending_ttl_s": None}
    return Scheduler(
        parse_config(yaml.safe_dump(doc)),
        precise_index=BlockIndex(),
        seed=seed,
        clock=clock,
    )


def token_request(ids: Sequence[int], **kw: Any) -> RoutingRequest:
    """A completions request given as token ids (keyed in blocks of token ids)."""
    return RoutingRequest(model="m", prompt="", token_ids=list(ids), **kw)


def context(sched: Scheduler, req: RoutingRequest, now: float = 0.0) -> SchedulingContext:
    """The scheduling context `Scheduler.schedule` would build for `req`."""
    keys = sched.keyer.keys(req)
    return SchedulingContext(
        request=req,
        now=now,
        keys=keys,
        prompt_tokens=sched.keyer.token_count(req),
        tokens_per_block=sched.config.blocks.tokens_per_block,
        rng=sched.rng,
        _lookup=lambda mode: sched.indexes[mode].longest_prefix(keys),
    )


def pods(sched: Scheduler) -> list[Pod]:
    return sched.registry.all()
