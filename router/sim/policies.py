"""Routing policies the simulator compares, each a scheduler config in the router's own YAML.

Owns the mapping policy name → `RouterConfig` (plugins + scheduling profiles), so the simulator
runs exactly the scheduler and scorers the live faces run. For a P/D fleet every policy's
scorers are placed in a `decode` profile (decode-filter) and a `prefill` profile
(prefill-filter) behind the `pd-profile-handler`.

Policies:

- ``random``: uniform random pod.
- ``round-robin``: pods taken in turn (`round-robin-picker`).
- ``least-queue``: fewest waiting requests (scraped, 100 ms stale) plus fewest requests the
  router has in flight there (immediate).
- ``llm-d-default`` (alias ``prefix-approx``): llm-d's default profile (the
  `inference-scheduling` guide) — prefix-cache-scorer on the approximate index the scheduler
  fills from its own picks (3; at most 256 blocks matched, as llm-d hashes at most 256),
  queue (2), KV utilization (2).
- ``llm-d-precise`` (alias ``prefix-precise``): llm-d's `precise-prefix-cache-aware` guide —
  precise-prefix-cache-scorer on the index fed by the engines' KV events (2), KV utilization
  (1), queue (1).
- ``sglang-cache-aware``: sglang-router's `cache_aware` (`scorers.sglang_cache_aware`, its CLI
  defaults); reads no block index (its own character tree).
- ``vllm-kv-aware``: vllm-router's `kv_aware` (`scorers.vllm_kv_aware`) on the precise index.
- ``dynamo-kv-cost``: Dynamo's KV-router block cost (`scorers.dynamo_kv_cost`) on the precise
  index.
- ``kvroute-default``: the router's default profile (`router.config.DEFAULT_PLUGINS_YAML`)
  on the precise index.
- ``oracle-pooled``: routes like ``least-queue``; the runner gives it one KV cache pool shared
  by every pod (see `router.sim.runner`), so its hit rate is what the fleet's total KV capacity
  can attain.
"""

from __future__ import annotations

import dataclasses

import yaml

from router.blocks import BlockConfig
from router.config import DEFAULT_PLUGINS_YAML, RouterConfig, parse_config

POLICIES: tuple[str, ...] = (
    "random",
    "round-robin",
    "least-queue",
    "prefix-approx",
    "prefix-precise",
    "kvroute-default",
    "oracle-pooled",
    "sglang-cache-aware",
    "vllm-kv-aware",
    "dynamo-kv-cost",
    "llm-d-default",
    "llm-d-precise",
)

#: Policies that are another policy under an older name (same config, same results).
ALIASES = {"prefix-approx": "llm-d-default", "prefix-precise": "llm-d-precise"}

#: Policies whose plugins read the precise (KV-event) index.
PRECISE_POLICIES = frozenset(
    {"prefix-precise", "llm-d-precise", "kvroute-default", "vllm-kv-aware", "dynamo-kv-cost"}
)
#: Policies the runner gives a fleet-wide shared KV cache.
POOLED_POLICIES = frozenset({"oracle-pooled"})

# (plugin type, parameters, weight); the picker comes last with weight None.
_Plugin = tuple[str, dict, float | None]

_LEAST_QUEUE: list[_Plugin] = [
    ("queue-scorer", {}, 1.0),
    ("active-request-scorer", {}, 1.0),
    ("max-score-picker", {}, None),
]

_PLUGINS: dict[str, list[_Plugin]] = {
    "random": [("random-picker", {}, None)],
    "round-robin": [("round-robin-picker", {}, None)],
    "least-queue": _LEAST_QUEUE,
    "llm-d-default": [
        ("prefix-cache-scorer", {"mode": "approximate", "maxPrefixBlocksToMatch": 256}, 3.0),
        ("queue-scorer", {}, 2.0),
        ("kv-cache-utilization-scorer", {}, 2.0),
        ("max-score-picker", {}, None),
    ],
    "llm-d-precise": [
        ("precise-prefix-cache-scorer", {}, 2.0),
        ("kv-cache-utilization-scorer", {}, 1.0),
        ("queue-scorer", {}, 1.0),
        ("max-score-picker", {}, None),
    ],
    "oracle-pooled": _LEAST_QUEUE,
    # The peers' decision procedures: the scorer gives its pick 1, the others 0.
    "sglang-cache-aware": [("sglang-cache-aware", {}, 1.0), ("max-score-picker", {}, None)],
    "vllm-kv-aware": [("vllm-kv-aware", {}, 1.0), ("max-score-picker", {}, None)],
    "dynamo-kv-cost": [("dynamo-kv-cost", {}, 1.0), ("max-score-picker", {}, None)],
}

#: Policies without a prefix scorer name the precise index, which nothing feeds for them: the
#: scheduler then keeps no approximate index it would never read.
_INDEX_MODE = {
    "random": "precise",
    "round-robin": "precise",
    "least-queue": "precise",
    "llm-d-default": "approximate",
    "llm-d-precise": "precise",
    "kvroute-default": "precise",
    "oracle-pooled": "precise",
    "sglang-cache-aware": "precise",  # reads only its own character tree
    "vllm-kv-aware": "precise",
    "dynamo-kv-cost": "precise",
}


#: The peers that keep no pending entries of the scheduler's in the precise index: vllm-router
#: keeps its own 2 s speculative inserts (in its plugin), Dynamo sees only KV events.
_NO_PENDING = frozenset({"vllm-kv-aware", "dynamo-kv-cost"})


def _default_plugins() -> list[_Plugin]:
    """kvroute's default profile, read from the router's own default config text."""
    doc = yaml.safe_load(DEFAULT_PLUGINS_YAML)
    types = {p.get("name", p["type"]): p for p in doc["plugins"]}
    out: list[_Plugin] = []
    for ref in doc["schedulingProfiles"][0]["plugins"]:
        p = types[ref["pluginRef"]]
        weight = None if p["type"].endswith("-picker") else float(ref.get("weight", 1.0))
        out.append((p["type"], dict(p.get("parameters") or {}), weight))
    return out


def _profile_yaml(name: str, plugins: list[_Plugin], role_filter: str | None) -> dict:
    refs: list[dict] = []
    if role_filter:
        refs.append({"pluginRef": role_filter})
    for ptype, _, weight in plugins:
        ref: dict = {"pluginRef": ptype}
        if weight is not None:
            ref["weight"] = weight
        refs.append(ref)
    return {"name": name, "plugins": refs}


def policy_config(
    name: str,
    *,
    block_size: int = 16,
    disaggregated: bool = False,
    pd_threshold: int = 256,
    seed: int = 0,
) -> RouterConfig:
    """The router config of policy `name` for a fleet with engine block size `block_size`.

    Requests in the simulator carry token ids, which the router keys in blocks of
    `block_size` tokens whatever the block mode; chars mode with 4 characters a token keeps
    `tokens_per_block` equal to `block_size` without needing a tokenizer file.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    base = ALIASES.get(name, name)
    plugins = _default_plugins() if base == "kvroute-default" else _PLUGINS[base]
    doc: dict = {
        "seed": seed,
        "prefix_index": {
            "mode": _INDEX_MODE[base],
            **({"pending_ttl_s": None} if base in _NO_PENDING else {}),
        },
        "plugins": [{"type": t, **({"parameters": p} if p else {})} for t, p, _ in plugins],
    }
    if disaggregated:
        doc["plugins"] += [
            {"type": "decode-filter"},
            {"type": "prefill-filter"},
            {"type": "pd-profile-handler", "parameters": {"threshold": pd_threshold}},
        ]
        doc["schedulingProfiles"] = [
            _profile_yaml("decode", plugins, "decode-filter"),
            _profile_yaml("prefill", plugins, "prefill-filter"),
        ]
    else:
        doc["schedulingProfiles"] = [_profile_yaml("default", plugins, None)]
    config = parse_config(yaml.safe_dump(doc, sort_keys=False), source=f"<policy {name}>")
    blocks = BlockConfig(mode="chars", block_size=block_size, chars_per_block=4 * block_size)
    return dataclasses.replace(config, blocks=blocks)
