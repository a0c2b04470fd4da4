"""configs/policies/*.yaml: each peer policy's live config parses, builds a scheduler, and runs
the same plugins with the same settings as the simulator policy of that name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from router.config import load_config
from router.scheduler import Scheduler
from router.sim.policies import policy_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "policies"
NAMES = ("sglang-cache-aware", "vllm-kv-aware", "dynamo-kv-cost", "llm-d-default", "llm-d-precise")


def _settings(plugin: Any) -> dict[str, Any]:
    """A plugin's plain settings (its parameters after defaults), without its state."""
    return {
        k: v
        for k, v in vars(plugin).items()
        if isinstance(v, (bool, int, float, str)) and k != "name"
    }


def test_every_peer_policy_ships_a_config() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_parses_and_matches_the_simulator_policy(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert len(cfg.pods) == 2
    live = Scheduler(cfg, seed=0)
    sim = Scheduler(policy_config(name, block_size=cfg.blocks.block_size), seed=0)
    assert [(r.ref, r.weight) for r in cfg.profiles[0].plugins] == [
        (r.ref, r.weight) for r in sim.config.profiles[0].plugins
    ]
    assert live.plugins.keys() == sim.plugins.keys()
    for key, plugin in live.plugins.items():
        assert type(plugin) is type(sim.plugins[key])
        assert _settings(plugin) == _settings(sim.plugins[key]), key
    assert live.needs_keys == sim.needs_keys
    if live.needs_keys:  # sglang-cache-aware reads no block index
        assert live.default_prefix_mode == sim.default_prefix_mode
        assert cfg.prefix_index.pending_ttl_s == sim.config.prefix_index.pending_ttl_s
    assert cfg.prefix_index.lru_capacity_per_pod == sim.config.prefix_index.lru_capacity_per_pod


def test_kv_event_policies_configure_event_endpoints() -> None:
    for name in ("vllm-kv-aware", "dynamo-kv-cost", "llm-d-precise"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert all(p.kv_events_endpoint for p in cfg.pods), name
