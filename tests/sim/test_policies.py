"""Simulator policies: every name builds the scheduler it promises, the peers' policies run end
to end, aliases are the same policy, and bad names are errors listing the known ones."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from router.sim.cli import add_parser, run_simulate
from router.sim.fleet import parse_fleet
from router.sim.latency import Profile, load_profile
from router.sim.policies import ALIASES, POLICIES, PRECISE_POLICIES, policy_config
from router.sim.report import WorkloadResult
from router.sim.runner import SimSettings, Simulation, plan_fleet, run_policies
from router.sim.workloads import Workload, make_workload

PEERS = ("sglang-cache-aware", "vllm-kv-aware", "dynamo-kv-cost", "llm-d-default", "llm-d-precise")


@pytest.fixture(scope="module")
def small_profile() -> Profile:
    return dataclasses.replace(load_profile("llama-3.1-8b-h100"), num_gpu_blocks_override=3072)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return make_workload(
        "shared-prompt", num_requests=120, seed=3, groups=8, system_tokens=2048, rate_per_s=12
    )


@pytest.fixture(scope="module")
def result(workload: Workload, small_profile: Profile) -> WorkloadResult:
    names = (*PEERS, *ALIASES, "round-robin")
    return run_policies(workload, parse_fleet("3"), names, small_profile, SimSettings(seed=5))


def _by_name(result: WorkloadResult) -> dict:
    return {p.name: p for p in result.policies}


def test_peer_policies_are_known_and_existing_names_kept() -> None:
    for name in (*PEERS, "random", "round-robin", "least-queue", "prefix-approx"):
        assert name in POLICIES
    for name in ("prefix-precise", "kvroute-default", "oracle-pooled"):
        assert name in POLICIES


@pytest.mark.parametrize(
    ("name", "plugins", "mode"),
    [
        ("sglang-cache-aware", [("sglang-cache-aware", 1.0)], "precise"),
        ("vllm-kv-aware", [("vllm-kv-aware", 1.0)], "precise"),
        ("dynamo-kv-cost", [("dynamo-kv-cost", 1.0)], "precise"),
        (
            "llm-d-default",
            [
                ("prefix-cache-scorer", 3.0),
                ("queue-scorer", 2.0),
                ("kv-cache-utilization-scorer", 2.0),
            ],
            "approximate",
        ),
        (
            "llm-d-precise",
            [
                ("precise-prefix-cache-scorer", 2.0),
                ("kv-cache-utilization-scorer", 1.0),
                ("queue-scorer", 1.0),
            ],
            "precise",
        ),
    ],
)
def test_peer_policy_configs_carry_the_published_weights(
    name: str, plugins: list[tuple[str, float]], mode: str
) -> None:
    cfg = policy_config(name)
    refs = [(r.ref, r.weight) for r in cfg.profiles[0].plugins if r.ref != "max-score-picker"]
    assert refs == plugins
    assert cfg.prefix_index.mode == mode


def test_llm_d_default_matches_llm_d_approximate_prefix_details() -> None:
    cfg = policy_config("llm-d-default", block_size=16)
    prefix = next(p for p in cfg.plugins if p.type == "prefix-cache-scorer")
    assert prefix.parameters == {"mode": "approximate", "maxPrefixBlocksToMatch": 256}
    assert cfg.blocks.chars_per_block == 16 * 4
    assert cfg.prefix_index.lru_capacity_per_pod == 31_250


def test_index_each_policy_reads() -> None:
    # The engines emit KV events only for policies that read the precise index.
    assert {"vllm-kv-aware", "dynamo-kv-cost", "llm-d-precise"} <= PRECISE_POLICIES
    assert not {"sglang-cache-aware", "llm-d-default"} & PRECISE_POLICIES
    # vllm-router and Dynamo keep no pending entries of the scheduler's; llm-d's guide does.
    assert policy_config("vllm-kv-aware").prefix_index.pending_ttl_s is None
    assert policy_config("dynamo-kv-cost").prefix_index.pending_ttl_s is None


def test_pd_fleet_puts_the_peer_plugin_in_both_profiles() -> None:
    cfg = policy_config("sglang-cache-aware", disaggregated=True)
    assert [p.name for p in cfg.profiles] == ["decode", "prefill"]
    assert all(any(r.ref == "sglang-cache-aware" for r in p.plugins) for p in cfg.profiles)


@pytest.mark.parametrize("name", PEERS)
def test_each_peer_policy_serves_every_request(
    result: WorkloadResult, workload: Workload, name: str
) -> None:
    p = _by_name(result)[name]
    assert p.requests == 120
    assert sorted(r.index for r in p.records) == list(range(120))
    assert p.prompt_tokens == workload.prompt_tokens
    assert 0.0 < p.hit_rate <= 1.0
    assert 0.0 < p.ttft_p50_s <= p.ttft_p95_s


@pytest.mark.parametrize("name", PEERS)
def test_cache_aware_peers_beat_round_robin_on_hits(result: WorkloadResult, name: str) -> None:
    by = _by_name(result)
    assert by[name].hit_rate > by["round-robin"].hit_rate


@pytest.mark.parametrize(("alias", "target"), sorted(ALIASES.items()))
def test_aliases_give_the_same_results(result: WorkloadResult, alias: str, target: str) -> None:
    by = _by_name(result)
    a, t = by[alias], by[target]
    assert (a.hit_rate, a.ttft_p50_s, a.ttft_p95_s) == (t.hit_rate, t.ttft_p50_s, t.ttft_p95_s)


def test_unknown_policy_is_an_error_listing_the_known_ones(small_profile: Profile) -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'sglang'; known: .*sglang-cache-aware"):
        policy_config("sglang")
    w = make_workload("shared-prompt", num_requests=4, seed=1)
    plan = plan_fleet(parse_fleet("2"), small_profile)
    with pytest.raises(ValueError, match="llm-d-precise"):
        Simulation(w, plan, "llm-d", SimSettings())


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["simulate", *argv])


def test_cli_runs_the_peer_policies_and_rejects_unknown_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ("--workload", "multi-turn", "--requests", "40", "--pods", "2")
    assert run_simulate(_args(*argv, "--policies", ",".join(PEERS), "--json")) == 0
    out = capsys.readouterr().out
    for name in PEERS:
        assert f'"name": "{name}"' in out
    assert run_simulate(_args(*argv, "--policies", "vllm-kv-aware,nope")) == 2
    err = capsys.readouterr().err
    assert "unknown policy nope" in err and "dynamo-kv-cost" in err
