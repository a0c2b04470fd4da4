"""Step-time model: profiles load and validate, costs move the right way, calibration holds."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from router.sim.calibration import compare, summarize
from router.sim.latency import LatencyModel, bundled_profiles, load_profile

REFERENCE = Path(__file__).parents[2] / "benchmarks" / "data" / "h100-bf16.json"
REQUIRED = ("llama-3.1-8b-h100", "llama-3.3-70b-fp8-h100-tp4", "gpt-oss-120b-b200")


def test_bundled_profiles_include_the_three_reference_setups() -> None:
    names = bundled_profiles()
    for name in REQUIRED:
        assert name in names
        p = load_profile(name)
        assert p.name == name
        assert p.num_gpu_blocks > 10_000


def test_kv_bytes_per_token_follow_the_model_shapes() -> None:
    assert load_profile("llama-3.1-8b-h100").kv_bytes_per_token == 131_072
    assert load_profile("llama-3.3-70b-fp8-h100-tp4").kv_bytes_per_token == 327_680
    assert load_profile("gpt-oss-120b-b200").kv_bytes_per_token == 73_728


def test_weights_match_the_published_checkpoint_sizes() -> None:
    gb = {n: load_profile(n).model.weight_bytes_total / 1e9 for n in REQUIRED}
    assert gb["llama-3.1-8b-h100"] == pytest.approx(16.06, rel=0.01)
    assert gb["llama-3.3-70b-fp8-h100-tp4"] == pytest.approx(72.7, rel=0.02)
    assert gb["gpt-oss-120b-b200"] == pytest.approx(65.0, rel=0.03)


def test_gpu_blocks_come_from_memory_left_after_weights() -> None:
    p = load_profile("llama-3.1-8b-h100")
    per_gpu = 85.0e9 * 0.9 - p.model.weight_bytes_total - 4.0e9
    assert p.num_gpu_blocks == int(per_gpu // (131_072 * 16))
    assert replace(p, num_gpu_blocks_override=1234).num_gpu_blocks == 1234
    tp4 = load_profile("gpt-oss-120b-b200-tp4")
    assert tp4.num_gpu_blocks > 4 * load_profile("gpt-oss-120b-b200").num_gpu_blocks


def test_user_profile_file_loads_and_unknown_fields_are_named(tmp_path: Path) -> None:
    src = (Path(__file__).parents[2] / "router/sim/profiles/llama-3.1-8b-h100.yaml").read_text()
    good = tmp_path / "mine.yaml"
    good.write_text(src.replace("name: llama-3.1-8b-h100", "name: mine") + "num_gpu_blocks: 99\n")
    p = load_profile(good)
    assert p.name == "mine" and p.num_gpu_blocks == 99
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("  layers: 32", "  layers: 32\n  layerz: 3"))
    with pytest.raises(ValueError, match="layerz"):
        load_profile(bad)
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("no-such-profile")
    with pytest.raises(ValueError, match="not found"):
        load_profile(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text(src.replace("hidden: 4096", "hidden: four"))
    with pytest.raises(ValueError, match="hidden"):
        load_profile(typo)


@pytest.mark.parametrize("name", REQUIRED)
def test_step_time_grows_with_tokens_context_and_batch(name: str) -> None:
    lm = LatencyModel(load_profile(name))
    prefill = [lm.prefill_time(n) for n in (16, 128, 512, 2048, 8192)]
    assert all(a < b for a, b in itertools.pairwise(prefill))
    cached = [lm.prefill_time(512, c) for c in (0, 1024, 8192, 32768)]
    assert all(a < b for a, b in itertools.pairwise(cached))
    batch = [lm.decode_step_time(b, 2048) for b in (1, 8, 64, 256)]
    assert all(a < b for a, b in itertools.pairwise(batch))
    ctx = [lm.decode_step_time(32, c) for c in (128, 2048, 16384)]
    assert all(a <= b for a, b in itertools.pairwise(ctx))
    assert lm.step_time(0, 0) == 0.0


def test_small_batches_are_memory_bound_and_large_ones_compute_bound() -> None:
    lm = LatencyModel(load_profile("llama-3.1-8b-h100"))
    # Weight streaming dominates: 64 decode tokens cost barely more than 1.
    assert lm.token_time(64) < 1.1 * lm.token_time(1)
    # Compute dominates: doubling a big batch nearly doubles the time.
    assert lm.token_time(8192) > 1.8 * lm.token_time(4096)


def test_a_cached_prefix_makes_prefill_cheaper_than_recomputing_it() -> None:
    lm = LatencyModel(load_profile("llama-3.1-8b-h100"))
    assert lm.prefill_time(256, 3840) < 0.3 * lm.prefill_time(4096)


def test_moe_reads_only_the_experts_a_small_batch_touches() -> None:
    p = load_profile("gpt-oss-120b-b200")
    lm = LatencyModel(p)
    launch = 2 * p.efficiency.kernel_latency_s
    # 1 token reads 4 of 128 experts; 256 tokens touch nearly all of them.
    assert lm.moe_time(1) - launch < 0.05 * (lm.moe_time(256) - launch)


def test_tensor_parallel_shards_the_work_and_adds_all_reduce() -> None:
    tp1 = LatencyModel(load_profile("gpt-oss-120b-b200"))
    tp4 = LatencyModel(load_profile("gpt-oss-120b-b200-tp4"))
    assert tp4.prefill_time(4096) < tp1.prefill_time(4096)
    assert tp4.allreduce_time(128) > 0 and tp1.allreduce_time(128) == 0


def test_cpu_reload_costs_block_bytes_over_pcie() -> None:
    p = load_profile("llama-3.1-8b-h100")
    lm = LatencyModel(p)
    assert lm.transfer_time_cpu(10) == pytest.approx(10 * 131_072 * 16 / 25e9)


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference measurements not present")
def test_model_matches_measured_h100_figures() -> None:
    rows = compare(json.loads(REFERENCE.read_text()))
    groups = summarize(rows)
    whole = {r.name: r for r in rows if r.group.startswith("whole-model")}
    # The 512-token eager run is bound by Python launch overhead, not by the GPU.
    assert abs(whole["L=2048"].error) < 0.12 and abs(whole["L=8192"].error) < 0.12
    decode = [r for r in rows if r.group == "decode step from parts"]
    assert len(decode) == 2 and all(abs(r.error) < 0.10 for r in decode)
    assert groups["gemm llama-3.1-8b-tp1"]["median_abs_error"] < 0.10
    assert groups["attn prefill llama-3.1-8b-tp1"]["median_abs_error"] < 0.10
    assert groups["attn decode llama-3.1-8b-tp1"]["median_abs_error"] < 0.15
    # Masked-kernel measurements are upper bounds: a flash kernel is not slower.
    assert all(r.model_ms <= r.measured_ms for r in rows if r.upper_bound)


def test_a_prefill_chunk_makes_the_step_slower_by_the_mixed_batch_cost() -> None:
    p = load_profile("llama-3.1-8b-h100")
    lm = LatencyModel(p)
    e = p.efficiency
    per_step = p.model.layers * e.mixed_batch_layer_latency_s
    assert per_step > 0
    decode = lm.step_time(64, 64, 0.0, 64 * 2048)
    mixed = lm.step_time(64, 64, 0.0, 64 * 2048, mixed=True)
    assert mixed - decode == pytest.approx(per_step)
    # Doubling the profile constant doubles the penalty; zero removes it.
    doubled = LatencyModel(
        replace(
            p, efficiency=replace(e, mixed_batch_layer_latency_s=2 * e.mixed_batch_layer_latency_s)
        )
    )
    base = doubled.step_time(64, 64, 0.0, 64 * 2048)
    assert doubled.step_time(64, 64, 0.0, 64 * 2048, mixed=True) - base == pytest.approx(
        2 * per_step
    )
    off = LatencyModel(replace(p, efficiency=replace(e, mixed_batch_layer_latency_s=0.0)))
    assert off.prefill_time(512) == pytest.approx(lm.prefill_time(512) - per_step)
    # A one-token query (a pulled P/D request's last token) is still a uniform decode batch.
    assert off.prefill_time(1, 1023) == pytest.approx(lm.prefill_time(1, 1023))


def test_step_overhead_is_paid_once_per_step_whatever_the_batch() -> None:
    p = load_profile("llama-3.1-8b-h100")
    lm = LatencyModel(p)
    more = LatencyModel(
        replace(
            p, efficiency=replace(p.efficiency, step_overhead_s=p.efficiency.step_overhead_s + 1e-3)
        )
    )
    for batch in (1, 64, 256):
        assert more.decode_step_time(batch, 1024) - lm.decode_step_time(batch, 1024) == (
            pytest.approx(1e-3)
        )
    assert more.prefill_time(4096) - lm.prefill_time(4096) == pytest.approx(1e-3)


@pytest.mark.parametrize("name", bundled_profiles())
def test_every_efficiency_constant_of_a_profile_says_where_it_comes_from(name: str) -> None:
    """Each engine constant is set explicitly in the YAML with a comment on its line or just
    above it (the source, or why it is an assumption)."""
    lines = (Path(__file__).parents[2] / f"router/sim/profiles/{name}.yaml").read_text().split("\n")
    start = (
        lines.index("efficiency:")
        if "efficiency:" in lines
        else next(i for i, ln in enumerate(lines) if ln.startswith("efficiency:"))
    )
    for field_name in ("step_overhead_s", "mixed_batch_layer_latency_s", "allreduce_latency_s"):
        at = next(
            i for i in range(start, len(lines)) if lines[i].strip().startswith(field_name + ":")
        )
        assert "#" in lines[at] or lines[at - 1].strip().startswith("#"), (name, field_name)
