"""`kvroute plan`: candidate fleets within a GPU budget, their evaluation in the simulator,
cost per million tokens, SLO attainment, the recommendation, and errors that say why."""

from __future__ import annotations

import argparse
import dataclasses
import json
from importlib import resources

import pytest
import yaml

from router.sim.fleet import parse_fleet
from router.sim.latency import load_profile, profile_from_dict
from router.sim.plan import (
    PLAN_POLICY,
    PlanError,
    candidate_fleets,
    scale_constant,
    sensitivity,
    tp_degrees,
)
from router.sim.plan_cli import add_parser
from router.sim.runner import SimSettings, run_policies
from router.sim.workloads import LengthDistribution, make_workload

SMALL = (
    "--gpus",
    "2",
    "--candidate",
    "2:tp1",
    "--candidate",
    "1p:tp1,1d:tp1",
    "--concurrency",
    "2,6",
    "--requests",
    "24",
    "--prompt-tokens",
    "512",
    "--output-tokens",
    "16",
    "--no-progress",
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_candidates_cover_aggregated_and_pd_shapes_within_the_budget() -> None:
    prof = load_profile("llama-3.1-8b-h100")
    cands = candidate_fleets(prof, 8)
    specs = [s for s, _ in cands]
    assert {"8:tp1", "4:tp2", "2:tp4", "1:tp8", "4p:tp1,1d:tp4", "2p:tp2,2d:tp2"} <= set(specs)
    assert len(specs) == len(set(specs))
    for spec, gpus in cands:
        assert gpus == 8 == parse_fleet(spec).gpus(prof.tp)
    wider = candidate_fleets(prof, 4, 8)
    assert {g for _, g in wider} == {4, 5, 6, 7, 8}


def test_a_model_too_big_for_one_gpu_is_not_planned_at_tp1() -> None:
    big = load_profile("llama-3.3-70b-fp8-h100-tp4")
    assert 1 not in tp_degrees(big, 8) and 4 in tp_degrees(big, 8)
    with pytest.raises(PlanError, match="does not fit on 1 GPU"):
        candidate_fleets(big, 1)


def test_plan_json_contract_cost_and_determinism(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, *SMALL, "--gpu-hour-usd", "3.6", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["workload"]["name"] == "random"
    fleets = [c["fleet"] for c in doc["candidates"]]
    assert fleets == ["2:tp1", "1p:tp1,1d:tp1"]
    for c in doc["candidates"]:
        for key in ("gpus", "tokens_per_s", "tokens_per_s_per_gpu", "usd_per_million_tokens"):
            assert c[key] > 0
        assert {"ttft_p95_s", "tpot_p95_s", "meets_slo"} <= set(c)
        assert c["meets_slo"] is True  # no SLO given
        assert c["tokens_per_s_per_gpu"] == pytest.approx(c["tokens_per_s"] / 2, rel=1e-4)
        # $3.6 a GPU-hour is $0.001 a GPU-second: 2 GPUs / tokens/s * 1e6 * 0.001.
        assert c["usd_per_million_tokens"] == pytest.approx(2e3 / c["tokens_per_s"], rel=1e-4)
        # The candidate's figures are its best load point (most tokens/s, SLO met).
        assert c["tokens_per_s"] == max(p["tokens_per_s"] for p in c["points"])
        assert [p["load"] for p in c["points"]] == ["concurrency 2", "concurrency 6"]
    cheapest = min(doc["candidates"], key=lambda c: c["usd_per_million_tokens"])
    assert doc["best"] == cheapest["fleet"]
    assert any(c["pareto"] for c in doc["candidates"])
    again = _run(capsys, *SMALL, "--gpu-hour-usd", "3.6", "--json")[1]
    assert again == out  # same seed, byte-identical


def test_an_unreachable_slo_recommends_nothing_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(capsys, *SMALL, "--slo-ttft-p95", "0.000001", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["best"] is None
    assert not any(c["meets_slo"] for c in doc["candidates"])
    code, text, _ = _run(capsys, *SMALL, "--slo-ttft-p95", "0.000001")
    assert "no candidate meets the SLOs" in text
    # A generous TPOT SLO with the same TTFT bound: still nothing, and each row says no.
    assert text.count(" no ") >= 2


def test_points_after_a_candidates_first_slo_miss_are_skipped_unless_full_sweep(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Concurrency 2 then 6, and a TTFT bound nobody meets: the first point misses, so the
    # higher load is not run.
    full = json.loads(_run(capsys, *SMALL, "--slo-ttft-p95", "1e-6", "--full-sweep", "--json")[1])
    assert all(len(c["points"]) == 2 for c in full["candidates"])
    quick = json.loads(_run(capsys, *SMALL, "--slo-ttft-p95", "1e-6", "--json")[1])
    for fc, qc in zip(full["candidates"], quick["candidates"], strict=True):
        assert [p["load"] for p in qc["points"]] == ["concurrency 2"]
        assert qc["points"][0] == fc["points"][0]  # the run that was made is the same run
        assert qc["meets_slo"] is False
    # Without an SLO nothing is skipped.
    plain = json.loads(_run(capsys, *SMALL, "--json")[1])
    assert all(len(c["points"]) == 2 for c in plain["candidates"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--slo-ttft-p95", "-1"), "--slo-ttft-p95"),
        (("--slo-tpot-p95", "0"), "--slo-tpot-p95"),
        (("--gpu-hour-usd", "nan"), "--gpu-hour-usd"),
        (("--gpus", "0"), "--gpus"),
        (("--profile", "no-such-gpu"), "no-such-gpu"),
        (("--gpus", "4", "--gpus-max", "2"), "--gpus-max"),
        (("--profile", "llama-3.3-70b-fp8-h100-tp4", "--gpus", "1"), "does not fit"),
        (("--profile", "llama-3.3-70b-fp8-h100-tp4", "--gpus", "3"), "between 3 and 3 GPUs"),
        (("--slo-ttft-p95", "0"), "positive number of seconds"),
        (("--candidate", "1:tp3"), "32 attention heads do not split evenly over 3"),
        (
            ("--profile", "llama-3.3-70b-fp8-h100-tp4", "--candidate", "2p:tp2,1d:tp1"),
            "no room for a KV cache on 1 GPU",
        ),
    ],
)
def test_bad_input_is_an_error_saying_which_and_why(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], needle: str
) -> None:
    code, _, err = _run(capsys, *argv, "--no-progress")
    assert code == 2
    assert err.startswith("kvroute plan: error:") and needle in err


# ------------------------------------------------------------------ sensitivity (tornado)
def _decode_heavy(n: int = 64) -> object:
    """A closed loop whose answers vary in length, so arrivals do not come in lockstep waves
    and the aggregated pod keeps meeting prefill chunks next to its decodes."""
    return make_workload(
        "random",
        seed=0,
        concurrency=16,
        num_requests=n,
        prompt=LengthDistribution(1024),
        output=LengthDistribution(256, 0.6, 16, 1024),
    )


def test_tornado_gain_rises_with_a_cost_only_the_aggregated_decode_steps_pay() -> None:
    """The mixed-batch penalty lands on every aggregated step that carries a prefill chunk
    next to decodes; the P/D decode pod never runs such a step. Made large so it dominates."""
    prof = load_profile("llama-3.1-8b-h100")
    eff = dataclasses.replace(prof.efficiency, mixed_batch_layer_latency_s=300e-6)
    prof = dataclasses.replace(prof, efficiency=eff)
    runs: list[str] = []
    base, rows = sensitivity(
        "1:tp1",
        "1p:tp1,1d:tp1",
        _decode_heavy(),  # type: ignore[arg-type]
        prof,
        SimSettings(),
        [("mixed_batch_layer_latency_s", "efficiency"), ("kv_link_latency_s", "profile")],
        0.5,
        runs.append,
    )
    mixed = next(r for r in rows if r.constant == "mixed_batch_layer_latency_s")
    assert mixed.low_value == pytest.approx(150e-6) and mixed.high_value == pytest.approx(450e-6)
    assert mixed.gain_low < base["gain"] < mixed.gain_high
    assert base["gain_per_gpu"] == pytest.approx((1 + base["gain"]) / 2 - 1)
    # 2 baseline runs, both fleets at both mixed values, only the P/D fleet for the link.
    assert len(runs) == 2 + 4 + 2
    assert runs.count("1:tp1") == 3
    assert rows[0].swing >= rows[1].swing


def test_tornado_gain_falls_when_the_kv_link_is_too_slow() -> None:
    # 134 MB of KV per 1,024-token prompt over a 1 GB/s link (the profile's, then a
    # simulator-settings override of it): the slower half of the tornado gains less.
    prof = dataclasses.replace(load_profile("llama-3.1-8b-h100"), kv_link_bandwidth=1e9)
    _, rows = sensitivity(
        "1:tp1",
        "1p:tp1,1d:tp1",
        _decode_heavy(32),  # type: ignore[arg-type]
        prof,
        SimSettings(),
        [("kv_link_bandwidth", "profile")],
        0.5,
    )
    assert rows[0].low_value == pytest.approx(0.5e9)
    assert rows[0].gain_low < rows[0].gain_high
    _, over = sensitivity(
        "1:tp1",
        "1p:tp1,1d:tp1",
        _decode_heavy(32),  # type: ignore[arg-type]
        load_profile("llama-3.1-8b-h100"),
        SimSettings(kv_link_bandwidth_Bps=1e9),
        [("kv_link_bandwidth_Bps", "link")],
        0.5,
    )
    assert over[0].gain_low == pytest.approx(rows[0].gain_low)
    assert over[0].gain_high == pytest.approx(rows[0].gain_high)


def test_the_kv_link_comes_from_the_decode_pods_profile_unless_overridden() -> None:
    """A P/D request's first token waits for its KV pull: a slower link in the profile shows
    in TTFT, and a `SimSettings` value replaces the profile's."""
    base = load_profile("llama-3.1-8b-h100")
    slow = dataclasses.replace(base, kv_link_latency_s=0.5)
    work = _decode_heavy(16)
    fleet = parse_fleet("1p:tp1,1d:tp1")

    def ttft(prof: object, settings: SimSettings) -> float:
        res = run_policies(work, fleet, [PLAN_POLICY], prof, settings)  # type: ignore[arg-type]
        return res.policies[0].ttft_p50_s

    fast_ttft = ttft(base, SimSettings())
    slow_ttft = ttft(slow, SimSettings())
    assert slow_ttft > fast_ttft + 0.4  # 0.5 s per pull on the way to every first token
    assert ttft(slow, SimSettings(kv_link_latency_s=0.002)) == pytest.approx(fast_ttft)
    text = resources.files("router.sim").joinpath("profiles/llama-3.1-8b-h100.yaml").read_text()
    data = yaml.safe_load(text)
    data["kv_link_bandwidth"] = 0
    with pytest.raises(ValueError, match="kv_link_bandwidth > 0"):
        profile_from_dict(data, "my.yaml")


def test_scaled_constants_stay_physical_and_bad_places_are_named() -> None:
    prof = load_profile("llama-3.1-8b-h100")
    up, _, value = scale_constant(prof, SimSettings(), "gemm_memory", "efficiency", 1.5)
    assert value == 1.0 and up.efficiency.gemm_memory == 1.0  # a fraction of peak caps at 1
    low, _, v = scale_constant(prof, SimSettings(), "kv_link_latency_s", "profile", 0.5)
    assert low.kv_link_latency_s == v == pytest.approx(0.001)
    over = SimSettings(kv_link_latency_s=0.004)
    _, sett, v = scale_constant(prof, over, "kv_link_latency_s", "link", 0.5)
    assert sett.kv_link_latency_s == v == pytest.approx(0.002)
    with pytest.raises(PlanError, match="not set in the settings"):
        scale_constant(prof, SimSettings(), "kv_link_latency_s", "link", 0.5)
    with pytest.raises(PlanError, match="unknown place"):
        scale_constant(prof, SimSettings(), "gemm_memory", "nowhere", 1.5)
    with pytest.raises(PlanError, match="aggregated and a disaggregated"):
        sensitivity("1:tp1", "2:tp1", _decode_heavy(), prof)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="between 0 and 1"):
        sensitivity("1:tp1", "1p:tp1,1d:tp1", _decode_heavy(), prof, step=1.5)  # type: ignore[arg-type]
