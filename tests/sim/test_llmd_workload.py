"""The llm-d "KV-cache wins you can see" re-creation: the qwen3-32b-h100-tp2 profile and the
`llmd-kv-wins` workload's shape and load ladder."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from router.sim.cli import LLMD_MAX_OUTSTANDING, add_parser, build_workloads, run_simulate
from router.sim.latency import bundled_profiles, load_profile
from router.sim.workloads import LLMD_LADDER, make_workload


def test_the_qwen3_profile_has_the_models_architecture() -> None:
    assert "qwen3-32b-h100-tp2" in bundled_profiles()
    p = load_profile("qwen3-32b-h100-tp2")
    m = p.model
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim) == (64, 5120, 64, 8, 128)
    assert (m.intermediate, m.vocab, p.tp) == (25600, 151936, 2)
    assert p.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    # Parameters recomputed from the shape (untied embeddings) match the profile's count.
    per_layer = 5120 * 8192 * 2 + 5120 * 1024 * 2 + 3 * 5120 * 25600
    assert m.params == pytest.approx(64 * per_layer + 2 * 151936 * 5120, rel=1e-3)
    # The benchmark's 1.8M distinct prompt tokens are ~73% of 8 pods' KV cache.
    fleet_tokens = 8 * p.num_gpu_blocks * p.block_size
    assert 0.70 < 150 * (6000 + 5 * 1200) / fleet_tokens < 0.78


def test_the_llmd_workload_has_the_published_shape() -> None:
    w = make_workload("llmd-kv-wins", stage_scale=0.05, seed=4)
    arrivals = w.arrivals
    prompts = {id(a.token_ids): a.token_ids for a in arrivals}
    assert len(prompts) == 150 * 5
    assert {len(t) for t in prompts.values()} == {7200}
    prefixes: dict[bytes, int] = {}
    for t in prompts.values():
        key = bytes(t[:6000])
        prefixes[key] = prefixes.get(key, 0) + 1
    assert len(prefixes) == 150 and set(prefixes.values()) == {5}
    assert {a.output_len for a in arrivals} == {1000}
    # inference-perf cycles through the shuffled prompts: every 750th request repeats.
    assert all(arrivals[i].token_ids is arrivals[i + 750].token_ids for i in range(100))
    assert w.warmup_s == pytest.approx(50 * 0.05)


def test_the_llmd_ladder_runs_3_to_60_requests_per_second() -> None:
    scale = 0.5
    w = make_workload("llmd-kv-wins", stage_scale=scale, seed=1)
    times = np.array([a.time_s for a in w.arrivals])
    start = 0.0
    assert LLMD_LADDER[1][0] == 3.0 and LLMD_LADDER[-1][0] == 60.0
    for rate, duration in LLMD_LADDER:
        d = duration * scale
        n = int(((times >= start) & (times < start + d)).sum())
        expected = rate * d
        assert abs(n - expected) < 5 * np.sqrt(expected) + 2, (rate, n, expected)
        start += d
    assert times.max() < start


def test_cli_picks_the_llmd_defaults_and_a_rate_replaces_the_ladder() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["simulate", "--workload", "llmd-kv-wins", "--rate", "20", "--requests", "50"]
    )
    (point,) = build_workloads(args, pods=8)
    w = point.workload
    assert point.rate_per_s == 20 and len(w.arrivals) == 50 and w.warmup_s == 0.0
    gaps = np.diff([a.time_s for a in w.arrivals])
    assert 0.02 < gaps.mean() < 0.09  # Poisson at 20 req/s


def test_cli_runs_the_llmd_recreation_on_its_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["--workload", "llmd-kv-wins", "--stage-scale", "0.01", "--requests", "120"]
    args = parser.parse_args(["simulate", *argv, "--policies", "random", "--json"])
    assert run_simulate(args) == 0
    (w,) = json.loads(capsys.readouterr().out)["workloads"]
    assert w["fleet"] == "8xboth[qwen3-32b-h100-tp2 tp2]"
    assert w["max_outstanding"] == LLMD_MAX_OUTSTANDING and w["warmup_s"] == 0.5
    (p,) = w["policies"]
    # The 0.5 s warm-up stage at 15 req/s is left out of the figures.
    assert p["warmup_requests"] > 0 and p["requests"] + p["warmup_requests"] == 120
