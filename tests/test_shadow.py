"""Shadow policies (`router.shadow`): config, no side effects on the live state, agreement of a
policy with itself, stats, explain and the simulator."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import ConfigError, RouterConfig, parse_config
from router.index import BlockIndex
from router.pods import MetricsSnapshot, Pod, Role
from router.request import RoutingRequest
from router.scheduler import Scheduler
from router.shadow_metrics import ShadowCollector
from router.sim.fleet import parse_fleet
from router.sim.latency import load_profile
from router.sim.policies import POLICIES, policy_config
from router.sim.policy_files import PolicyFile
from router.sim.runner import SimSettings, Simulation, plan_fleet
from router.sim.workloads import make_workload

MODEL = "m"
SYSTEM = "You are a careful assistant. " * 12


def _pods(n: int) -> tuple[Pod, ...]:
    return tuple(Pod(endpoint=f"10.0.0.{i}:8000", models=frozenset({MODEL})) for i in range(n))


def _config(live: str, shadows: tuple[str, ...], pods: int = 4, seed: int = 7) -> RouterConfig:
    return dataclasses.replace(
        policy_config(live, seed=seed), pods=_pods(pods), shadow_policies=shadows
    )


def _request(session: int, turn: int) -> RoutingRequest:
    prompt = SYSTEM + "".join(f"[s{session} turn {t}] tell me more. " * 3 for t in range(turn))
    return RoutingRequest(model=MODEL, prompt=prompt)


def _drive(
    sched: Scheduler, steps: list[tuple[int, int, int]], now: float = 0.0, feed: bool = False
) -> list:
    """Schedule one request per step (session, turn, scraped waiting of pod 0) and run its
    hooks as a face would; returns the decisions. `feed`: the engine's KV events record the
    prompt in the precise index at the first token."""
    out = []
    first = sched.registry.all()[0].endpoint
    for i, (session, turn, waiting) in enumerate(steps):
        sched.registry.set_metrics(first, MetricsSnapshot(waiting=waiting, taken_at=now))
        d = sched.schedule(_request(session, turn), now=now)
        sched.on_pick(d, now=now)
        if i % 3 != 2:  # every third request is still running when the next one arrives
            if feed:
                sched.precise_index.add_blocks(d.target, d.request.block_keys, now=now + 0.05)
            sched.on_first_token(d, now=now + 0.05)
            sched.on_complete(d, None, now=now + 0.1)
        out.append(d)
        now += 0.2
    return out


def _state(sched: Scheduler, keys: list[int]) -> tuple:
    pods = tuple(
        (
            p.endpoint,
            p.inflight_requests,
            p.inflight_prefill_tokens,
            p.inflight_prefilling,
            p.last_picked_at,
            p.healthy,
        )
        for p in sched.registry.all()
    )
    indexes = tuple(
        (
            len(index),
            index.entry_count(),
            index.pending_count(),
            tuple(sorted(index.longest_prefix(keys).items())),
        )
        for index in (sched.approx_index, sched.precise_index)
    )
    return pods, indexes


# --------------------------------------------------------------------------- config
def test_config_takes_policy_names_and_aliases() -> None:
    c = parse_config("shadow_policies: [round-robin, prefix-approx, sglang-cache-aware]")
    assert c.shadow_policies == ("round-robin", "prefix-approx", "sglang-cache-aware")
    assert parse_config("").shadow_policies == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: 1\nshadow_policies: [round-robin, robin-hood]\n", "x.yaml:2: shadow_policies[1]"),
        ("seed: 1\nshadow_policies:\n  - random\n  - robin-hood\n", "x.yaml:4: shadow_policies[1]"),
        ("shadow_policies: round-robin\n", "'shadow_policies' must be a list"),
        ("shadow_policies: [random, random]\n", "'random' is listed twice"),
    ],
)
def test_config_errors_name_the_policy_and_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "x.yaml")
    assert message in str(e.value)
    if "robin-hood" in text:
        assert "'robin-hood'" in str(e.value)
        for name in POLICIES:  # the valid names are listed
            assert name in str(e.value)


# --------------------------------------------------------------------------- no side effects
STEPS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(0, 8)), min_size=1, max_size=25
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS)
def test_shadows_change_neither_the_live_decisions_nor_the_live_state(steps) -> None:
    # The same live policy twice, one with every policy as a shadow: the same picks, and the
    # same registry and index state after every request.
    shadows = tuple(p for p in POLICIES if p not in ("prefix-approx", "prefix-precise"))
    with_shadows = Scheduler(
        _config("kvroute-default", shadows), precise_index=BlockIndex(), seed=3
    )
    alone = Scheduler(_config("kvroute-default", ()), precise_index=BlockIndex(), seed=3)
    a = _drive(with_shadows, steps, feed=True)
    b = _drive(alone, steps, feed=True)
    assert [(d.target, d.prefill, d.fallbacks) for d in a] == [
        (d.target, d.prefill, d.fallbacks) for d in b
    ]
    keys = _request(0, 4).block_keys or with_shadows.keyer.keys(_request(0, 4))
    assert _state(with_shadows, keys) == _state(alone, keys)
    assert all(len(d.shadows) == len(shadows) for d in a)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, live=st.sampled_from(["round-robin", "llm-d-default", "sglang-cache-aware"]))
def test_running_the_shadows_again_leaves_the_state_as_it_was(steps, live: str) -> None:
    sched = Scheduler(_config(live, ("llm-d-default", "vllm-kv-aware", "dynamo-kv-cost")))
    for d in _drive(sched, steps):
        keys = d.request.block_keys or []
        before = _state(sched, keys)
        again = sched.shadows.run(d.request, d, None, now=100.0)
        assert [s.target for s in again] and _state(sched, keys) == before


def test_round_robin_live_keys_requests_and_records_picks_for_the_shadows() -> None:
    # The live profile reads no index, yet the llm-d-default shadow needs the record of picks
    # (which holds the LIVE picks) and the captured figures need keys.
    cfg = dataclasses.replace(
        parse_config(
            "plugins: [{type: round-robin-picker}]\nschedulingProfiles: "
            "[{name: default, plugins: [{pluginRef: round-robin-picker}]}]"
        ),
        pods=_pods(3),
        shadow_policies=("llm-d-default",),
    )
    sched = Scheduler(cfg)
    assert sched.needs_keys and sched.records_approx
    decisions = _drive(sched, [(0, 1, 0), (0, 2, 0), (0, 3, 0)])
    last = decisions[-1]
    # Round-robin moved on; the llm-d-default shadow would have followed the prefix.
    assert last.target != decisions[-2].target
    sp = last.shadows[0]
    assert sp.policy == "llm-d-default" and sp.target in {d.target for d in decisions[:2]}
    assert sp.captured_tokens == last.prefix_tokens[sp.target] > last.captured_tokens


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize(
    "policy",
    [
        "round-robin",
        "random",
        "least-queue",
        "llm-d-default",
        "sglang-cache-aware",
        "kvroute-default",
        "dynamo-kv-cost",
        "vllm-kv-aware",
    ],
)
def test_a_policy_shadowing_itself_agrees_on_every_request(policy: str) -> None:
    sched = Scheduler(_config(policy, (policy,)), precise_index=BlockIndex())
    steps = [(i % 4, 1 + i // 4 % 4, i % 7) for i in range(60)]
    decisions = _drive(sched, steps, feed=True)
    assert all(d.shadows[0].agrees for d in decisions)
    stats = sched.shadows.policies[0].stats
    live = sched.shadows.live_stats
    assert stats.requests == stats.agreements == live.requests == 60
    assert stats.captured_tokens == live.captured_tokens > 0
    assert stats.prompt_tokens == live.prompt_tokens == sum(d.prompt_tokens for d in decisions)


def test_stats_and_metrics_count_picks_captured_tokens_and_predictions() -> None:
    sched = Scheduler(_config("llm-d-default", ("round-robin", "kvroute-default")))
    decisions = _drive(sched, [(i % 2, 1 + i // 2, 0) for i in range(8)])
    rr, kv = sched.shadows.policies
    assert rr.stats.captured_tokens == sum(
        d.prefix_tokens.get(d.shadows[0].target, 0) for d in decisions
    )
    assert rr.stats.agreements == sum(d.shadows[0].agrees for d in decisions)
    # kvroute-default predicts TTFT itself; round-robin gets none (the live one predicts none).
    assert kv.stats.predicted_ttft_count == 8 and kv.stats.predicted_ttft_sum_s > 0
    assert rr.stats.predicted_ttft_count == 0
    families = {f.name: f for f in ShadowCollector(lambda: sched.shadows).collect()}
    samples = {
        (s.name, s.labels.get("policy")): s.value for f in families.values() for s in f.samples
    }
    assert samples[("kvroute_shadow_requests_total", "round-robin")] == 8
    assert samples[("kvroute_shadow_prefix_tokens_captured_total", "round-robin")] == (
        rr.stats.captured_tokens
    )
    assert samples[("kvroute_shadow_pick_agreement_total", "kvroute-default")] == (
        kv.stats.agreements
    )
    assert samples[("kvroute_shadow_predicted_ttft_seconds_count", "kvroute-default")] == 8
    assert list(ShadowCollector(lambda: None).collect()) == []
    data = decisions[-1].explain()
    assert [s["policy"] for s in data["shadows"]] == ["round-robin", "kvroute-default"]
    assert set(data["shadows"][0]) >= {"pick", "captured_tokens", "agrees", "predicted_ttft_s"}


# --------------------------------------------------------------------------- explain, sim
def _kvroute(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kvroute")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "router.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_explain_shows_the_shadows() -> None:
    out = _kvroute("explain", "--shadow", "round-robin", "--shadow", "llm-d-default")
    assert out.returncode == 0, out.stderr
    assert "shadow policy" in out.stdout and "round-robin" in out.stdout
    data = json.loads(_kvroute("explain", "--json", "--shadow", "llm-d-default").stdout)
    (shadow,) = data["shadows"]
    # The same prefix scorer on the same seeded state: it agrees with the live pick here.
    assert shadow["policy"] == "llm-d-default" and shadow["pick"] == data["pick"]
    assert shadow["agrees"] is True and shadow["captured_tokens"] == data["captured_tokens"]
    bad = _kvroute("explain", "--shadow", "nope")
    assert bad.returncode == 2 and "unknown policy 'nope'" in bad.stderr


def test_simulator_runs_shadows_from_a_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "live.yaml"
    path.write_text("shadow_policies: [kvroute-default, round-robin, sglang-cache-aware]\n")
    pf = PolicyFile("live", path, parse_config(path.read_text(), str(path)))
    workload = make_workload("multi-turn", num_requests=60, seed=3, rate_per_s=16)
    profile = dataclasses.replace(load_profile("llama-3.1-8b-h100"), num_gpu_blocks_override=3072)
    sim = Simulation(workload, plan_fleet(parse_fleet("4"), profile), pf, SimSettings())
    result = sim.run()
    assert result.requests == 60
    report = sim.scheduler.shadows.report()
    assert report["live"]["requests"] >= 60
    own = report["shadows"]["kvroute-default"]
    assert own["agreements"] == own["requests"] == report["live"]["requests"]
    assert report["shadows"]["round-robin"]["captured_rate"] < report["live"]["captured_rate"]


def test_pd_shadows_run_their_decode_and_prefill_profiles() -> None:
    roles = [Role.PREFILL, Role.PREFILL, Role.DECODE, Role.DECODE]
    pods = tuple(
        Pod(endpoint=f"10.0.1.{i}:8000", models=frozenset({MODEL}), role=role)
        for i, role in enumerate(roles)
    )
    base = policy_config("llm-d-default", disaggregated=True, pd_threshold=0, seed=5)
    sched = Scheduler(
        dataclasses.replace(base, pods=pods, shadow_policies=("llm-d-default", "round-robin"))
    )
    for d in _drive(sched, [(0, t, 0) for t in range(1, 6)]):
        own, rr = d.shadows
        assert d.prefill is not None and own.agrees and own.target == d.prefill
        assert rr.target in {p.endpoint for p in pods if p.role is Role.PREFILL}


def test_a_shadows_picks_do_not_depend_on_the_other_shadows() -> None:
    # Shadows share index lookups within a request; an unkeyed one (round-robin) placed
    # before a keyed one must not change what the keyed one sees.
    steps = [(i % 3, 1 + i // 3 % 4, i % 5) for i in range(40)]
    picks = []
    for shadows in (("llm-d-precise",), ("round-robin", "sglang-cache-aware", "llm-d-precise")):
        sched = Scheduler(_config("llm-d-default", shadows), precise_index=BlockIndex())
        decisions = _drive(sched, steps, feed=True)
        picks.append([(d.shadows[-1].target, d.shadows[-1].captured_tokens) for d in decisions])
    assert picks[0] == picks[1]
    assert any(captured for _, captured in picks[0])
