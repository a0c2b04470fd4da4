"""Plugin type name → class. Names follow llm-d's scheduler where the concept is the same."""

from __future__ import annotations

from typing import Any, Literal

from scorers.active_request import ActiveRequestScorer
from scorers.base import PluginEnv
from scorers.dynamo_kv_cost import DynamoKvCostScorer
from scorers.filters import (
    DecodeFilter,
    HealthyFilter,
    LabelSelectorFilter,
    ModelFilter,
    PrefillFilter,
    PrefixCacheAffinityFilter,
)
from scorers.kv_utilization import KVCacheUtilizationScorer
from scorers.load_aware import LoadAwareScorer
from scorers.lora_affinity import LoraAffinityScorer
from scorers.no_hit_lru import NoHitLRUScorer
from scorers.pickers import (
    MaxScorePicker,
    RandomPicker,
    RoundRobinPicker,
    SoftmaxPicker,
    WeightedRandomPicker,
)
from scorers.predicted_ttft import PredictedTTFTScorer
from scorers.prefix import PrecisePrefixCacheScorer, PrefixCacheScorer
from scorers.queue import QueueScorer
from scorers.session_affinity import SessionAffinityScorer
from scorers.sglang_cache_aware import SglangCacheAwareScorer
from scorers.uncached_tokens import UncachedTokensLoadScorer
from scorers.vllm_kv_aware import VllmKvAwareScorer

PluginKind = Literal["filter", "scorer", "picker"]

PLUGINS: dict[str, tuple[PluginKind, type]] = {
    "prefix-cache-scorer": ("scorer", PrefixCacheScorer),
    "precise-prefix-cache-scorer": ("scorer", PrecisePrefixCacheScorer),
    "queue-scorer": ("scorer", QueueScorer),
    "kv-cache-utilization-scorer": ("scorer", KVCacheUtilizationScorer),
    "active-request-scorer": ("scorer", ActiveRequestScorer),
    "load-aware-scorer": ("scorer", LoadAwareScorer),
    "session-affinity-scorer": ("scorer", SessionAffinityScorer),
    "lora-affinity-scorer": ("scorer", LoraAffinityScorer),
    "no-hit-lru-scorer": ("scorer", NoHitLRUScorer),
    "uncached-tokens-load-scorer": ("scorer", UncachedTokensLoadScorer),
    "predicted-ttft-scorer": ("scorer", PredictedTTFTScorer),
    # Peers' whole decision procedures: the chosen pod scores 1, the rest 0.
    "sglang-cache-aware": ("scorer", SglangCacheAwareScorer),
    "vllm-kv-aware": ("scorer", VllmKvAwareScorer),
    "dynamo-kv-cost": ("scorer", DynamoKvCostScorer),
    "decode-filter": ("filter", DecodeFilter),
    "prefill-filter": ("filter", PrefillFilter),
    "by-label-selector": ("filter", LabelSelectorFilter),
    "model-filter": ("filter", ModelFilter),
    "healthy-filter": ("filter", HealthyFilter),
    "prefix-cache-affinity-filter": ("filter", PrefixCacheAffinityFilter),
    "max-score-picker": ("picker", MaxScorePicker),
    "random-picker": ("picker", RandomPicker),
    "weighted-random-picker": ("picker", WeightedRandomPicker),
    "softmax-picker": ("picker", SoftmaxPicker),
    "round-robin-picker": ("picker", RoundRobinPicker),
}


def build_plugin(plugin_type: str, name: str, params: dict[str, Any], env: PluginEnv) -> Any:
    kind_cls = PLUGINS.get(plugin_type)
    if kind_cls is None:
        raise KeyError(plugin_type)
    return kind_cls[1](name, params, env)


def plugin_kind(plugin_type: str) -> PluginKind | None:
    entry = PLUGINS.get(plugin_type)
    return entry[0] if entry else None
