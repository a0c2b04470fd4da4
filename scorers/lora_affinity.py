"""`lora-affinity-scorer`: prefer pods that already have the request's LoRA adapter loaded.

1.0 adapter running on the pod (scraped `vllm:lora_requests_info`), 0.8 adapter waiting there,
0.5 the pod serves the adapter (configured) but it is not loaded now, 0 otherwise. Requests for
a base model score every pod 0 (nothing to tell apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.pods import Pod
from scorers.base import PluginEnv, SchedulingContext, check_params


class LoraAffinityScorer:
    def __init__(self, name: str, params: dict[str, Any], env: PluginEnv) -> None:
        check_params("lora-affinity-scorer", params, {})
        self.name = name

    def score(self, ctx: SchedulingContext, pods: Sequence[Pod]) -> list[float]:
        adapter = ctx.request.lora_adapter
        if not adapter:
            return [0.0] * len(pods)
        out = []
        for p in pods:
            if adapter in p.metrics.running_adapters:
                out.append(1.0)
            elif adapter in p.metrics.waiting_adapters:
                out.append(0.8)
            elif adapter in p.adapters:
                out.append(0.5)
            else:
                out.append(0.0)
        return out
