"""The discrete-event runner: every policy end to end, ordering properties, P/D, closed loop,
the precise index fed by engine events, determinism, and the CLI's JSON contract."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from router.sim.cli import add_parser, run_simulate
from router.sim.fleet import parse_fleet
from router.sim.latency import Profile, load_profile
from router.sim.policies import POLICIES
from router.sim.report import PolicyResult, WorkloadResult, to_json
from router.sim.runner import SimSettings, Simulation, plan_fleet, run_policies
from router.sim.workloads import LengthDistribution, Workload, make_workload

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_profile() -> Profile:
    """Llama-3.1-8B on H100 with a 48k-token KV cache, so small workloads fill it."""
    return dataclasses.replace(load_profile("llama-3.1-8b-h100"), num_gpu_blocks_override=3072)


@pytest.fixture(scope="module")
def shared_prompt() -> Workload:
    # 32 groups x 4k tokens: 2.7x one pod's cache, so only group-affine routing keeps hits.
    return make_workload(
        "shared-prompt", num_requests=200, seed=1, groups=32, system_tokens=4096, rate_per_s=16
    )


@pytest.fixture(scope="module")
def shared_prompt_result(shared_prompt: Workload, small_profile: Profile) -> WorkloadResult:
    return run_policies(shared_prompt, parse_fleet("4"), POLICIES, small_profile, SimSettings())


def _policy(result: WorkloadResult, name: str) -> PolicyResult:
    return next(p for p in result.policies if p.name == name)


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_serves_every_request(
    shared_prompt_result: WorkloadResult, shared_prompt: Workload, name: str
) -> None:
    p = _policy(shared_prompt_result, name)
    assert p.requests == 200
    assert sorted(r.index for r in p.records) == list(range(200))
    assert p.prompt_tokens == shared_prompt.prompt_tokens
    assert 0.0 < p.hit_rate <= 1.0
    assert 0.0 < p.ttft_p50_s <= p.ttft_p95_s <= p.ttft_p99_s
    assert 0.0 < p.tpot_p50_s <= p.tpot_p95_s
    assert p.output_tokens_per_s > 0
    assert p.per_gpu_tokens_per_s == pytest.approx(p.output_tokens_per_s / 4)
    assert p.imbalance >= 1.0
    assert p.preemptions >= 0


def test_prefix_precise_halves_round_robin_ttft_on_shared_prompt(
    shared_prompt_result: WorkloadResult,
) -> None:
    precise = _policy(shared_prompt_result, "prefix-precise")
    rr = _policy(shared_prompt_result, "round-robin")
    assert precise.hit_rate > rr.hit_rate + 0.2
    assert rr.ttft_p50_s >= 2.0 * precise.ttft_p50_s


def test_cache_aware_policies_reach_90_percent_of_the_oracle(
    shared_prompt_result: WorkloadResult,
) -> None:
    for name in ("prefix-precise", "kvroute-default", "prefix-approx"):
        assert _policy(shared_prompt_result, name).hit_rate_vs_oracle >= 0.9


def test_oracle_hit_rate_bounds_every_policy(shared_prompt_result: WorkloadResult) -> None:
    oracle = _policy(shared_prompt_result, "oracle-pooled").hit_rate
    for p in shared_prompt_result.policies:
        assert p.hit_rate <= oracle + 0.005, p.name


def test_round_robin_spreads_requests_evenly(
    shared_prompt: Workload, small_profile: Profile
) -> None:
    sim = Simulation(shared_prompt, plan_fleet(parse_fleet("4"), small_profile), "round-robin")
    sim.run()
    finished = [ps.engine.metrics().finished_requests for ps in sim.pods.values()]
    assert finished == [50, 50, 50, 50]


def test_precise_index_mirrors_the_engines_caches(
    shared_prompt: Workload, small_profile: Profile
) -> None:
    """Every KV event reached the index: at the end it holds exactly what each engine caches."""
    sim = Simulation(shared_prompt, plan_fleet(parse_fleet("3"), small_profile), "prefix-precise")
    sim.run()
    index = sim.scheduler.precise_index
    for endpoint, ps in sim.pods.items():
        engine_keys = ps.engine.cached_keys()
        assert engine_keys
        assert index.pod_block_count(endpoint) == len(engine_keys)
        for key in engine_keys:
            assert endpoint in {pod for pod, _ in index.holders(key)}


def test_multi_turn_prefix_routing_beats_random(small_profile: Profile) -> None:
    w = make_workload("multi-turn", num_requests=150, seed=3, rate_per_s=16)
    r = run_policies(w, parse_fleet("4"), ["random", "kvroute-default"], small_profile)
    rand, best = r.policies
    assert best.hit_rate > rand.hit_rate + 0.15


def test_pd_fleet_prefills_remotely_and_pulls_kv(small_profile: Profile) -> None:
    w = make_workload(
        "random",
        num_requests=60,
        seed=0,
        prompt=LengthDistribution(1024),
        output=LengthDistribution(64),
        concurrency=8,
    )
    plan = plan_fleet(parse_fleet("2p1d"), small_profile)
    sim = Simulation(w, plan, "least-queue", SimSettings(pd_threshold=0))
    result = sim.run()
    assert result.requests == 60
    assert sum(link.transfers for link in sim.links.values()) == 60
    moved = sum(link.bytes_moved for link in sim.links.values())
    assert moved == 60 * 64 * small_profile.kv_bytes_per_block  # 1024 tokens = 64 blocks
    pre = [ps.engine.metrics() for ps in sim.pods.values() if ps.role.value == "prefill"]
    assert sum(m.finished_requests for m in pre) == 60
    assert all(m.used_blocks == 0 for m in pre)  # pinned blocks released after each pull


def test_pd_threshold_keeps_short_uncached_prompts_local(small_profile: Profile) -> None:
    w = make_workload(
        "random",
        num_requests=20,
        seed=0,
        prompt=LengthDistribution(200),
        output=LengthDistribution(8),
    )
    plan = plan_fleet(parse_fleet("1p1d"), small_profile)
    sim = Simulation(w, plan, "round-robin", SimSettings(pd_threshold=256))
    assert sim.run().requests == 20
    assert not sim.links


def test_closed_loop_never_exceeds_its_concurrency(small_profile: Profile) -> None:
    w = make_workload("random", num_requests=80, seed=2, concurrency=5)
    r = Simulation(w, plan_fleet(parse_fleet("2"), small_profile), "least-queue").run()
    events = sorted(
        [(rec.arrival_s, 1) for rec in r.records] + [(rec.finish_s, -1) for rec in r.records],
        key=lambda e: (e[0], e[1]),
    )
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak == 5


def test_closed_loop_turn_waits_for_its_previous_turn_and_think_time(
    small_profile: Profile,
) -> None:
    w = make_workload("multi-turn", num_requests=60, seed=4, concurrency=6, think_s_mean=0.5)
    r = Simulation(w, plan_fleet(parse_fleet("2"), small_profile), "kvroute-default").run()
    rec = {x.index: x for x in r.records}
    followups = [a for a in w.arrivals if a.prev >= 0]
    assert followups
    for a in followups:
        assert rec[a.index].arrival_s >= rec[a.prev].finish_s + a.think_s - 1e-9
    # Answers are replayed by the next turn, so later turns hit the cache.
    assert r.hit_rate > 0.3


def test_same_seed_gives_identical_json(shared_prompt: Workload, small_profile: Profile) -> None:
    a = run_policies(shared_prompt, parse_fleet("2"), ["random", "prefix-approx"], small_profile)
    b = run_policies(shared_prompt, parse_fleet("2"), ["random", "prefix-approx"], small_profile)
    assert to_json([a]) == to_json([b])


def _cli_json(hash_seed: str) -> bytes:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    cmd = [
        sys.executable,
        "-m",
        "router.sim.cli",
        "--workload",
        "multi-turn",
        "--requests",
        "40",
        "--pods",
        "2",
        "--policies",
        "round-robin,prefix-precise",
        "--json",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True, timeout=120)
    return out.stdout


def test_json_is_byte_identical_across_processes() -> None:
    """Different hash seeds: no set or dict ordering of strings leaks into the results."""
    assert _cli_json("1") == _cli_json("2")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return parser.parse_args(["simulate", *argv])


def test_cli_json_follows_the_interface_contract(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = run_simulate(
        _args(
            "--workload",
            "shared-prompt",
            "--requests",
            "30",
            "--fleet",
            "2",
            "--policies",
            "round-robin,oracle-pooled",
            "--json",
            "--plot",
            str(tmp_path),
        )
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    (w,) = doc["workloads"]
    assert w["name"] == "shared-prompt" and isinstance(w["fleet"], str)
    assert [p["name"] for p in w["policies"]] == ["round-robin", "oracle-pooled"]
    for p in w["policies"]:
        for key in (
            "requests",
            "hit_rate",
            "ttft_p50_s",
            "ttft_p95_s",
            "ttft_p99_s",
            "tpot_p50_s",
            "output_tokens_per_s",
            "per_gpu_tokens_per_s",
            "imbalance",
            "preemptions",
        ):
            assert key in p
        assert p["requests"] == 30
    pngs = sorted(x.name for x in tmp_path.iterdir())
    assert any(n.endswith("ttft-cdf.png") for n in pngs)
    assert any(n.endswith("hit-rate.png") for n in pngs)
    assert any(n.endswith("throughput-vs-concurrency.png") for n in pngs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--policies", "fastest"), "unknown policy fastest"),
        (("--fleet", "3x"), "fleet group"),
        (("--fleet", "2", "--pods", "2"), "not both"),
        (("--workload", "nope"), "unknown workload 'nope'"),
        (("--requests", "0"), "--requests must be >= 1"),
        (("--concurrency", "a"), "--concurrency must be integers"),
        (("--trace", "/nonexistent/trace.jsonl"), "No such file"),
    ],
)
def test_cli_rejects_bad_arguments_with_exit_code_2(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_simulate(_args(*argv)) == 2
    assert message in capsys.readouterr().err


def test_cli_replays_a_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        json.dumps(
            {
                "timestamp": 100 * i,
                "input_length": 1500,
                "output_length": 20,
                "hash_ids": [0, i, i + 100],
            }
        )
        for i in range(30)
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    code = run_simulate(
        _args("--trace", str(trace), "--pods", "2", "--policies", "prefix-precise", "--json")
    )
    assert code == 0
    (w,) = json.loads(capsys.readouterr().out)["workloads"]
    (p,) = w["policies"]
    assert w["name"] == "t" and p["requests"] == 30
    # Every request after the first shares the leading 512-token block.
    assert p["hit_rate"] > 0.25


def test_json_rounds_floats_and_marks_a_missing_oracle_as_null(
    shared_prompt: Workload, small_profile: Profile
) -> None:
    r = run_policies(shared_prompt, parse_fleet("2"), ["round-robin"], small_profile)
    (p,) = json.loads(to_json([r]))["workloads"][0]["policies"]
    assert p["hit_rate_vs_oracle"] is None
    for key in ("hit_rate", "ttft_p50_s", "output_tokens_per_s"):
        assert len(repr(p[key]).replace(".", "").lstrip("0")) <= 8  # 6 significant digits


def test_pooled_oracle_resumes_pods_that_waited_for_space_in_the_pool(
    small_profile: Profile,
) -> None:
    """Overload with long prompts: pods stall on a full shared pool and must be woken when
    other pods free blocks, or the run would never finish."""
    w = make_workload(
        "random",
        num_requests=40,
        seed=5,
        rate_per_s=20,
        prompt=LengthDistribution(40_000, 0.2, 1000, 47_000),  # near one pod's 49k tokens
        output=LengthDistribution(300),
    )
    sim = Simulation(w, plan_fleet(parse_fleet("4"), small_profile), "oracle-pooled")
    stalls: list[str] = []
    original = sim._on_step

    def watch(ps: Any, t: float) -> None:
        original(ps, t)
        if ps.endpoint in sim._stalled and ps.endpoint not in stalls:
            stalls.append(ps.endpoint)

    sim._on_step = watch  # type: ignore[method-assign]
    assert sim.run().requests == 40
    assert stalls, "the workload must make some pod wait for space in the pool"
