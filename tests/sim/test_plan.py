"""`kvroute plan`: candidate fleets within a GPU budget, their evaluation in the simulator,
cost per million tokens, SLO attainment, the recommendation, and errors that say why."""

from __future__ import annotations

import argparse
import json

import pytest

from router.sim.fleet import parse_fleet
from router.sim.latency import load_profile
from router.sim.plan import PlanError, candidate_fleets, tp_degrees
from router.sim.plan_cli import add_parser

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
    ],
)
def test_bad_input_is_an_error_saying_which_and_why(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], needle: str
) -> None:
    code, _, err = _run(capsys, *argv, "--no-progress")
    assert code == 2
    assert err.startswith("kvroute plan: error:") and needle in err
