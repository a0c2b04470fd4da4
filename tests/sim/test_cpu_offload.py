"""The CPU KV tier in simulated fleets: sized by `Profile.cpu_kv_cache_gib` or
`--cpu-offload-gib`, it turns GPU evictions into reloads (more hits) that cost PCIe time in the
step that reloads them; without it, `kvroute plan` prints what it printed before."""

from __future__ import annotations

import argparse
import dataclasses
import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from router.sim.cli import add_parser as add_simulate_parser
from router.sim.engine import EngineConfig
from router.sim.fleet import parse_fleet
from router.sim.latency import Profile, bundled_profiles, load_profile, profile_from_dict
from router.sim.plan_cli import add_parser as add_plan_parser
from router.sim.report import PolicyResult
from router.sim.runner import SimSettings, run_policies
from router.sim.workloads import LengthDistribution, Workload, make_workload

GIB = 2**30
#: 1,024 GPU blocks (16k tokens) against 16 groups × 2,048-token prefixes (2,048 blocks): the
#: working set is twice the GPU KV cache, so a group's prefix is often evicted before it recurs.
SMALL_GPU = dataclasses.replace(load_profile("llama-3.1-8b-h100"), num_gpu_blocks_override=1024)


def _many_groups() -> Workload:
    return make_workload(
        "shared-prompt",
        seed=0,
        groups=16,
        system_tokens=2048,
        num_requests=160,
        rate_per_s=8.0,
        question=LengthDistribution(64),
        output=LengthDistribution(8),
    )


def _run(prof: Profile, settings: SimSettings) -> PolicyResult:
    res = run_policies(_many_groups(), parse_fleet("1"), ["round-robin"], prof, settings)
    return res.policies[0]


def test_the_cpu_tier_is_sized_from_the_profile_in_whole_blocks_of_all_tp_shards() -> None:
    for name in bundled_profiles():
        prof = load_profile(name)
        assert prof.cpu_kv_cache_gib == 0  # bundled: no CPU tier unless asked for
        assert EngineConfig.from_profile(prof).num_cpu_blocks == 0
    llama = dataclasses.replace(load_profile("llama-3.1-8b-h100"), cpu_kv_cache_gib=64)
    # 2·32 layers·8 KV heads·128·2 bytes = 128 KiB a token, 2 MiB a 16-token block.
    assert llama.kv_bytes_per_block == 2 * 2**20
    assert EngineConfig.from_profile(llama).num_cpu_blocks == 64 * 512
    # TP2: the pod's GiB hold the same whole blocks (each rank keeps its half of each).
    qwen = dataclasses.replace(load_profile("qwen3-32b-h100-tp2"), cpu_kv_cache_gib=10.5)
    assert qwen.tp == 2
    assert EngineConfig.from_profile(qwen).num_cpu_blocks == int(
        10.5 * GIB // qwen.kv_bytes_per_block
    )
    assert EngineConfig.from_profile(qwen, num_cpu_blocks=7).num_cpu_blocks == 7


def test_a_cpu_tier_reloads_evicted_prefixes_and_the_reload_costs_pcie_time() -> None:
    none = _run(SMALL_GPU, SimSettings())
    cpu = _run(SMALL_GPU, SimSettings(cpu_kv_cache_gib=4))  # 2,048 blocks: the working set
    assert none.hit_rate < 0.6
    assert cpu.hit_rate > none.hit_rate + 0.25
    # The same tier with a free reload (a hypothetical infinite PCIe bandwidth) has exactly the
    # same hits; what it saves is the reload time the real tier adds to each reloading step.
    free = _run(
        dataclasses.replace(SMALL_GPU, cpu_offload_bandwidth=1e18), SimSettings(cpu_kv_cache_gib=4)
    )
    assert free.hit_rate == cpu.hit_rate
    assert free.ttft_mean_s < cpu.ttft_mean_s < none.ttft_mean_s
    # A slow link makes the reload cost more than recomputing: it shows in TTFT.
    slow = _run(
        dataclasses.replace(SMALL_GPU, cpu_offload_bandwidth=1e9), SimSettings(cpu_kv_cache_gib=4)
    )
    assert slow.hit_rate == cpu.hit_rate
    assert slow.ttft_mean_s > none.ttft_mean_s


def test_the_setting_overrides_the_profile_either_way() -> None:
    with_tier = dataclasses.replace(SMALL_GPU, cpu_kv_cache_gib=4)
    from_profile = _run(with_tier, SimSettings()).to_json()
    assert from_profile == _run(SMALL_GPU, SimSettings(cpu_kv_cache_gib=4)).to_json()
    off = _run(with_tier, SimSettings(cpu_kv_cache_gib=0)).to_json()
    assert off == _run(SMALL_GPU, SimSettings()).to_json()
    assert off["hit_rate"] < from_profile["hit_rate"]
    with pytest.raises(ValueError, match="cpu_kv_cache_gib"):
        SimSettings(cpu_kv_cache_gib=-1)


def test_a_profile_with_a_negative_or_non_numeric_cpu_tier_is_rejected() -> None:
    text = resources.files("router.sim").joinpath("profiles/llama-3.1-8b-h100.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["cpu_kv_cache_gib"] == 0
    data["cpu_kv_cache_gib"] = 32
    assert profile_from_dict(data, "my.yaml").num_cpu_blocks == 32 * 512
    data["cpu_kv_cache_gib"] = -1
    with pytest.raises(ValueError, match=r"my\.yaml: cpu_kv_cache_gib must be .* ≥ 0"):
        profile_from_dict(data, "my.yaml")
    data["cpu_kv_cache_gib"] = "lots"
    with pytest.raises(ValueError, match=r"my\.yaml\.cpu_kv_cache_gib: expected a number"):
        profile_from_dict(data, "my.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvroute")
    sub = parser.add_subparsers(dest="command")
    add_simulate_parser(sub)
    add_plan_parser(sub)
    return parser


@pytest.mark.parametrize("command", ["simulate", "plan"])
@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf"])
def test_a_bad_cpu_offload_gib_is_an_error_naming_the_flag(
    capsys: pytest.CaptureFixture[str], command: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args([command, "--cpu-offload-gib", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --cpu-offload-gib: {value!r} is not a number of GiB" in err


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_the_flag_takes_zero_or_a_positive_number(command: str) -> None:
    assert _parser().parse_args([command]).cpu_offload_gib is None
    assert _parser().parse_args([command, "--cpu-offload-gib", "0"]).cpu_offload_gib == 0.0
    assert _parser().parse_args([command, "--cpu-offload-gib", "1.5"]).cpu_offload_gib == 1.5


PLAN = (
    "plan",
    "--gpus",
    "1",
    "--candidate",
    "1:tp1",
    "--workload",
    "shared-prompt",
    "--groups",
    "16",
    "--prefix-tokens",
    "2048",
    "--question-tokens",
    "64",
    "--output-tokens",
    "8",
    "--concurrency",
    "4",
    "--requests",
    "160",
    "--no-progress",
    "--json",
)


def _plan(capsys: pytest.CaptureFixture[str], profile: Path, *extra: str) -> str:
    args = _parser().parse_args([*PLAN, "--profile", str(profile), *extra])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_plan_json_is_unchanged_without_the_flag_and_shows_the_tier_with_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The many-groups workload on a pod of 1,024 GPU blocks (a profile file): a 4 GiB tier
    (2,048 blocks) holds what the GPU evicts, and the plan sees the hits."""
    text = resources.files("router.sim").joinpath("profiles/llama-3.1-8b-h100.yaml").read_text()
    data = yaml.safe_load(text)
    data["num_gpu_blocks"] = 1024
    profile = tmp_path / "small-gpu.yaml"
    profile.write_text(yaml.safe_dump(data))
    default = _plan(capsys, profile)
    zero = json.loads(_plan(capsys, profile, "--cpu-offload-gib", "0"))
    assert "cpu_offload_gib" not in json.loads(default)
    assert zero.pop("cpu_offload_gib") == 0
    # An explicit 0 is the default's run: same figures, and the default's JSON has no new key.
    assert json.dumps(zero, indent=2) == default.rstrip("\n")
    tier = json.loads(_plan(capsys, profile, "--cpu-offload-gib", "4"))
    assert tier["cpu_offload_gib"] == 4
    without = json.loads(default)["candidates"][0]["points"][0]
    with_tier = tier["candidates"][0]["points"][0]
    assert with_tier["ttft_p50_s"] < without["ttft_p50_s"]
    assert with_tier["tokens_per_s"] > without["tokens_per_s"]
