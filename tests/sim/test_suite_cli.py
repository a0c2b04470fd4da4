"""The workload-suite face of `kvroute simulate`: shape flags, rate / speedup sweeps, warm-up,
the client cap on outstanding requests, router overhead, per-request JSONL, config files as
policies, the progress bar and the up-front matplotlib check."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import default_config
from router.sim.cli import add_parser, build_workloads, run_simulate
from router.sim.fleet import parse_fleet
from router.sim.latency import Profile, load_profile
from router.sim.policy_files import parse_policy_file
from router.sim.report import summarize
from router.sim.runner import SimSettings, Simulation, plan_fleet, run_policies
from router.sim.workloads import LengthDistribution, Workload, make_workload

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
CONTRACT_KEYS = ("name", "hit_rate", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s")
NEW_KEYS = ("ttft_mean_s", "ttft_p90_s", "requests_per_s", "client_wait_mean_s")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["simulate", *argv])


@pytest.fixture(scope="module")
def small_profile() -> Profile:
    return dataclasses.replace(load_profile("llama-3.1-8b-h100"), num_gpu_blocks_override=3072)


def _small_shared(**kw: object) -> Workload:
    base: dict[str, object] = dict(
        num_requests=60, seed=3, groups=6, system_tokens=1024, rate_per_s=20
    )
    base.update(kw)
    return make_workload("shared-prompt", **base)


# --------------------------------------------------------------------------- parsing
def test_every_new_flag_parses() -> None:
    a = _args(
        "--workload", "shared-prompt", "--groups", "3", "--prefix-tokens", "100",
        "--question-tokens", "10", "--users-per-group", "2", "--turns", "2-4",
        "--rate", "3,10", "--speedup", "1,2", "--max-outstanding", "7", "--warmup-s", "1.5",
        "--router-overhead-s", "0.002", "--requests-jsonl", "x.jsonl", "--progress",
        "--policy-config", "a=f.yaml", "--policy-config", "b=g.yaml", "--stage-scale", "0.5",
    )  # fmt: skip
    assert (a.groups, a.prefix_tokens, a.question_tokens, a.users_per_group) == (3, 100, 10, 2)
    assert (a.turns, a.rate, a.speedup) == ("2-4", "3,10", "1,2")
    assert (a.max_outstanding, a.warmup_s, a.router_overhead_s) == (7, 1.5, 0.002)
    assert a.requests_jsonl == "x.jsonl" and a.progress is True and a.stage_scale == 0.5
    assert a.policy_config == ["a=f.yaml", "b=g.yaml"]
    defaults = _args()
    assert defaults.progress is None and defaults.max_outstanding is None
    assert defaults.router_overhead_s == SimSettings().router_overhead_s > 0


def test_shape_flags_set_the_generators_fields() -> None:
    a = _args(
        "--workload", "shared-prompt", "--groups", "3", "--prefix-tokens", "100",
        "--question-tokens", "10", "--users-per-group", "2", "--requests", "30",
    )  # fmt: skip
    (point,) = build_workloads(a, pods=2)
    prompts = {id(x.token_ids): x for x in point.workload.arrivals}
    assert len(prompts) == 3 * 2  # one recurring prompt per (group, user)
    assert {x.prompt_len for x in prompts.values()} == {110}
    assert len({bytes(x.token_ids[:100]) for x in prompts.values()}) == 3
    a = _args("--workload", "multi-turn", "--turns", "3", "--requests", "40")
    (point,) = build_workloads(a, pods=2)
    turns: dict[str, int] = {}
    for x in point.workload.arrivals:
        turns[x.session] = turns.get(x.session, 0) + 1
    assert max(turns.values()) <= 3 and 3 in turns.values()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--rate", "0"), "--rate: '0' is not a positive number"),
        (("--rate", "5,abc"), "--rate: 'abc' is not a positive number"),
        (("--rate", "-2"), "--rate: '-2' is not a positive number"),
        (("--rate", "5,"), "--rate: '' is not a positive number"),
        (("--trace", "t.jsonl", "--speedup", "nan"), "--speedup: 'nan' is not a positive"),
        (("--speedup", "2"), "--speedup applies to --trace"),
        (("--workload", "multi-turn", "--groups", "4"), "--groups applies to shared-prompt"),
        (("--workload", "multi-turn", "--turns", "5-2"), "--turns: '5-2' needs 1 <= MIN"),
        (("--max-outstanding", "0"), "--max-outstanding must be >= 1"),
        (("--warmup-s", "-1"), "--warmup-s must be a number >= 0"),
        (("--policy-config", "nofile"), "expected NAME=FILE"),
        (("--policy-config", "random=x.yaml"), "'random' is a built-in policy name"),
    ],
)
def test_bad_sweep_and_shape_values_are_errors_naming_them(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_simulate(_args(*argv)) == 2
    assert message in capsys.readouterr().err


def test_unknown_policy_lists_builtin_and_file_policies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ("--policies", "nope", "--policy-config", f"mine={DATA / 'llmd-load-only.yaml'}")
    assert run_simulate(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert "unknown policy nope" in err and "llm-d-precise" in err and "mine" in err


# --------------------------------------------------------------------------- sweeps
def test_rate_sweep_adds_one_workload_entry_per_rate(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--workload", "shared-prompt", "--requests", "20", "--pods", "2")
    code = run_simulate(_args(*argv, "--rate", "4,16", "--policies", "round-robin", "--json"))
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert [w["rate_per_s"] for w in doc["workloads"]] == [4, 16]
    for w in doc["workloads"]:
        assert w["name"] == "shared-prompt" and isinstance(w["fleet"], str)
        (p,) = w["policies"]
        for key in (*CONTRACT_KEYS, "output_tokens_per_s", *NEW_KEYS):
            assert key in p
        assert p["ttft_p50_s"] <= p["ttft_p90_s"] <= p["ttft_p95_s"]
        assert p["requests"] == 20
    # A faster arrival rate packs the same 20 requests into less time.
    slow, fast = doc["workloads"]
    assert fast["policies"][0]["makespan_s"] < slow["policies"][0]["makespan_s"]


def test_speedup_sweep_on_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps(
                {"timestamp": 500 * i, "input_length": 600, "output_length": 8, "hash_ids": [0, i]}
            )
            + "\n"
            for i in range(12)
        )
    )
    argv = ("--trace", str(trace), "--pods", "2", "--policies", "least-queue", "--json")
    assert run_simulate(_args(*argv, "--speedup", "1,4")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [w["speedup"] for w in doc["workloads"]] == [1, 4]
    spans = [w["policies"][0]["makespan_s"] for w in doc["workloads"]]
    assert spans[1] < spans[0] / 2


def test_without_sweeps_the_entry_has_no_sweep_keys(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--workload", "random", "--requests", "10", "--pods", "2", "--policies", "random")
    assert run_simulate(_args(*argv, "--json")) == 0
    (w,) = json.loads(capsys.readouterr().out)["workloads"]
    assert not {"rate_per_s", "speedup", "max_outstanding", "warmup_s"} & set(w)


# --------------------------------------------------------------------------- runner
def test_warmup_requests_are_left_out_of_the_figures(small_profile: Profile) -> None:
    w = _small_shared()
    cut = w.arrivals[20].time_s
    plan = plan_fleet(parse_fleet("2"), small_profile)
    sim = Simulation(w, plan, "round-robin", SimSettings(warmup_s=cut))
    r = sim.run()
    measured = [a for a in w.arrivals if a.time_s >= cut]
    assert r.requests == len(measured) == 60 - 20
    assert r.warmup_requests == 20
    assert {rec.index for rec in r.records} == {a.index for a in measured}
    # The figures are those of the measured requests alone.
    alone = summarize("x", r.records, [])
    assert (alone.ttft_p90_s, alone.hit_rate) == (r.ttft_p90_s, r.hit_rate)


def test_the_client_cap_bounds_outstanding_requests(small_profile: Profile) -> None:
    w = _small_shared(rate_per_s=200, output=LengthDistribution(64))  # far over capacity
    plan = plan_fleet(parse_fleet("2"), small_profile)
    r = Simulation(w, plan, "least-queue", SimSettings(max_outstanding=5)).run()
    assert r.requests == 60
    edges = sorted([(x.arrival_s, 1) for x in r.records] + [(x.finish_s, -1) for x in r.records])
    level = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        level += step
        peak = max(peak, level)
    assert peak == 5
    assert all(x.arrival_s >= (x.scheduled_s or 0.0) for x in r.records)
    assert r.client_wait_mean_s > 0
    uncapped = Simulation(w, plan, "least-queue", SimSettings()).run()
    assert uncapped.ttft_p90_s > r.ttft_p90_s  # the server queue moved to the client


def test_router_overhead_is_in_every_ttft(small_profile: Profile) -> None:
    w = make_workload("random", num_requests=1, seed=2, prompt=LengthDistribution(512))
    plan = plan_fleet(parse_fleet("1"), small_profile)
    base = Simulation(w, plan, "random", SimSettings(router_overhead_s=0.0)).run()
    slow = Simulation(w, plan, "random", SimSettings(router_overhead_s=0.25)).run()
    assert slow.ttft_p50_s - base.ttft_p50_s == pytest.approx(0.25, abs=1e-9)


# --------------------------------------------------------------------------- JSONL
def test_requests_jsonl_records_each_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "req.jsonl"
    argv = (
        "--workload", "shared-prompt", "--requests", "24", "--pods", "3", "--groups", "2",
        "--policies", "prefix-precise,random", "--requests-jsonl", str(out),
    )  # fmt: skip
    assert run_simulate(_args(*argv)) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 24
    assert {r["policy"] for r in rows} == {"prefix-precise", "random"}
    for r in rows:
        assert r["pod"] in {p["endpoint"] for p in r["pods"]} and len(r["pods"]) == 3
        assert 0.0 <= r["predicted_hit"] <= 1.0
        assert r["actual_hit"] == pytest.approx(r["cached_tokens"] / r["prompt_tokens"], 1e-5)
        assert r["ttft_s"] == pytest.approx(r["first_token_s"] - r["sent_s"], abs=2e-6)
        assert r["fleet"] == "3" and r["warmup"] is False
        assert r["scheduled_s"] <= r["sent_s"] < r["first_token_s"] <= r["finish_s"]
    precise = [r for r in rows if r["policy"] == "prefix-precise"]
    assert all("precise-prefix-cache-scorer" in p["scores"] for p in precise[0]["pods"])
    # With 2 groups, later requests find their prefix and the router predicts it.
    late = sorted(precise, key=lambda r: r["index"])[12:]
    assert all(r["predicted_hit"] > 0 for r in late)
    assert all(r["actual_hit"] > 0 for r in late)


# --------------------------------------------------------------------------- config files
def test_a_config_file_runs_like_the_builtin_policy_it_spells(small_profile: Profile) -> None:
    w = _small_shared()
    fleet = parse_fleet("3")
    path = REPO / "configs" / "policies" / "llm-d-default.yaml"
    as_file = parse_policy_file(f"file={path}")
    assert not as_file.reads_precise_index()
    r = run_policies(w, fleet, ["llm-d-default", as_file], small_profile, SimSettings())
    builtin, loaded = r.policies
    assert loaded.name == "file"
    assert (loaded.hit_rate, loaded.ttft_p90_s) == (builtin.hit_rate, builtin.ttft_p90_s)


def test_a_precise_config_file_is_fed_kv_events(small_profile: Profile) -> None:
    pf = parse_policy_file(f"p={REPO / 'configs' / 'policies' / 'llm-d-precise.yaml'}")
    assert pf.reads_precise_index()
    # 24 groups x 4k tokens: 2x one pod's cache, so only prefix-affine routing keeps hits.
    w = _small_shared(num_requests=90, groups=24, system_tokens=4096)
    r = run_policies(w, parse_fleet("3"), ["random", pf], small_profile, SimSettings())
    rnd, precise = r.policies
    assert precise.hit_rate > rnd.hit_rate + 0.15


def test_policy_file_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read config"):
        parse_policy_file(f"x={tmp_path / 'missing.yaml'}")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n  - type: no-such-scorer\n")
    with pytest.raises(ValueError, match="no-such-scorer"):
        parse_policy_file(f"x={bad}")
    # A file without plugins gets kvroute's default profile, as `kvroute proxy` would.
    empty = tmp_path / "empty.yaml"
    empty.write_text("seed: 1\n")
    assert parse_policy_file(f"x={empty}").config.profiles == default_config().profiles
    pf = parse_policy_file(f"x={DATA / 'llmd-load-only.yaml'}")
    with pytest.raises(ValueError, match="pd-profile-handler"):
        pf.config_for(block_size=16, disaggregated=True, seed=0)


def test_cli_runs_a_policy_config_beside_the_builtins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = (
        "--workload", "shared-prompt", "--requests", "20", "--pods", "2", "--policies",
        "random", "--policy-config", f"mine={DATA / 'llmd-estimated-1-1-1.yaml'}", "--json",
    )  # fmt: skip
    assert run_simulate(_args(*argv)) == 0
    (w,) = json.loads(capsys.readouterr().out)["workloads"]
    assert [p["name"] for p in w["policies"]] == ["random", "mine"]


# --------------------------------------------------------------------------- progress, plot
def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--workload", "random", "--requests", "70", "--pods", "2", "--policies", "random")
    assert run_simulate(_args(*argv, "--progress", "--json")) == 0
    cap = capsys.readouterr()
    assert "100%" in cap.err and "random 70/70" in cap.err
    assert "100%" not in cap.out
    json.loads(cap.out)  # stdout stays pure JSON


def test_missing_matplotlib_is_reported_before_the_run(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from router.sim.cli import main\n"
        f"sys.exit(main(['--workload', 'random', '--plot', {str(tmp_path / 'c')!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "--plot needs matplotlib" in out.stderr and "pip install" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "c").exists()
    assert out.stdout == ""  # nothing ran


def test_ttft_floor_bounds_every_policy_and_is_in_the_json(small_profile: Profile) -> None:
    """The floor: each measured request alone on an idle pod with the best cache any policy
    got for it — below every policy's TTFT percentiles, and a cold prompt's own prefill."""
    wl = _small_shared(rate_per_s=40)
    res = run_policies(
        wl,
        parse_fleet("2"),
        ["round-robin", "kvroute-default", "oracle-pooled"],
        small_profile,
        SimSettings(router_overhead_s=0.002),
    )
    assert res.ttft_floor_p95_s is not None and res.ttft_floor_p50_s is not None
    assert 0.002 < res.ttft_floor_p50_s <= res.ttft_floor_p95_s
    for p in res.policies:
        assert res.ttft_floor_p50_s <= p.ttft_p50_s + 1e-9
        assert res.ttft_floor_p95_s <= p.ttft_p95_s + 1e-9
    # 6 of 60 requests are their group's first (cold 1k-token prefix): the p95 is a cold one.
    from router.sim.latency import LatencyModel

    cold = LatencyModel(small_profile).prefill_time(1024)
    assert res.ttft_floor_p95_s >= cold
    doc = res.to_json()
    assert doc["ttft_floor_p95_s"] == pytest.approx(res.ttft_floor_p95_s, rel=1e-5)
