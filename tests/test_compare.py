"""benchmarks/compare.py's plumbing: pinning, lag figures, validity, and a tiny end-to-end run.

The pure parts (CPU lists, histogram quantiles, the validity verdict, ranking, repeats, the
validation's agreement figures) are checked against hand-computed values; pinning and the
loop-lag probe against real processes and a real event loop. The end-to-end test runs the two
kvroute routers (and the peers when their packages are installed) on a 2-pod emulated fleet
with a handful of multi-turn requests and a short raw-overhead run, then checks the `--json`
object has every contract field, the counts add up, the router was confined to its core and
the /proc accounting saw it. Speed and validity are not asserted (the machine may be busy).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare
import peers
import validate_peers

from router.config import parse_config
from router.emulator.metrics import STEP_LAG_BUCKETS
from router.loadgen import LoopLagProbe

BENCH = Path(compare.__file__).resolve().parent

RUN_KEYS = set(compare.RUN_FIELDS)
OVERHEAD_KEYS = {"router", "rps", "added_p50_ms", "added_p99_ms"}


def test_process_tree_accounting_includes_children() -> None:
    code = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); x=sum(range(10**7)); time.sleep(30)"  # noqa: E501
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while len(peers.process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = peers.process_tree(proc.pid)
        assert len(tree) == 2 and tree[0] == proc.pid
        # Two interpreters are resident, and the parent burned measurable CPU.
        assert peers.tree_rss_bytes(proc.pid) > peers.tree_rss_bytes(tree[1])
        deadline = time.monotonic() + 10
        while peers.tree_cpu_seconds(proc.pid) < 0.05 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peers.tree_cpu_seconds(proc.pid) >= 0.05
    finally:
        for pid in reversed(peers.process_tree(proc.pid)):
            os.kill(pid, 9)
        proc.wait()


def test_kvroute_config_has_both_profiles() -> None:
    text = peers.kvroute_config({"pods": [{"endpoint": "127.0.0.1:1", "models": ["m"]}]})
    cfg = parse_config(text)
    assert [p.name for p in cfg.profiles] == ["default", "round-robin"]
    # The peers' request timeout, not kvroute's shorter first-byte default.
    assert cfg.proxy.first_byte_timeout_s == 1800.0


def test_unknown_router_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        compare.parse_args(["--routers", "kvroute,nginx"])
    assert e.value.code == 2
    assert "nginx" in capsys.readouterr().err


def test_compare_writes_the_contract_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    # kvroute and one peer when installed: each run starts a fleet on one pinned core.
    routers = ["kvroute"]
    routers += [
        r for r in ("sglang-round_robin", "vllm-cache_aware") if not peers.ROUTERS[r].missing()
    ][:1]
    cmd = [
        sys.executable, str(BENCH / "compare.py"), "--workload", "multi-turn", "--pods", "2",
        "--requests", "12", "--concurrency", "4", "--speedup", "8", "--max-tokens", "8",
        "--overhead-requests", "300", "--overhead-concurrency", "16",
        "--routers", ",".join(routers), "--json", str(out), "--plot", str(tmp_path / "plots"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["router"] for r in result["runs"]] == routers
    for row in result["runs"]:
        assert set(row) == RUN_KEYS
        assert row["workload"] == "multi-turn"
        assert row["failed"] == 0
        # Confined to its core; every request counted at some pod; lag measured on both sides.
        assert row["router_cpus"] == "0"
        assert sum(row["pod_requests"]) == 12 and len(row["pod_requests"]) == 2
        assert row["step_lag_p99_ms"] is not None and row["loop_lag_p99_ms"] is not None
        parts = (row["step_lag_p99_ms"], row["send_lag_p99_ms"], row["loop_lag_p99_ms"])
        assert row["lag_p99_ms"] == max(parts)
        assert row["valid"] == (row["lag_p99_ms"] <= 2.0)
        assert (row["rank"] is None) == (not row["valid"])
        assert 0.0 <= row["hit_rate"] <= 1.0
        assert row["ttft_p50_s"] <= row["ttft_p95_s"] <= row["ttft_p99_s"]
        assert row["router_cpu_s"] > 0 and row["router_peak_rss_mb"] > 10
        # What else kept the fleet's core busy, and the machine's load, beside each figure.
        assert 0.0 < row["fleet_cpu_busy"] <= 1.0 and row["loadavg_1m"] >= 0.0
        assert 0.0 < row["fleet_cpu_share"] < 2.0  # the pods and the load generator did work
    assert [o["router"] for o in result["overhead"]] == routers
    for o in result["overhead"]:
        assert set(o) == OVERHEAD_KEYS and o["rps"] > 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "ttft_p95.png",
        "hit_rate.png",
        "ttft_cdf_multi-turn.png",
    }
    # The printed table names every router, and flags the invalid runs.
    for r in routers:
        assert r in done.stdout
    for row in result["runs"]:
        line = next(x for x in done.stdout.splitlines() if x.startswith(row["router"] + " "))
        assert line.rstrip().endswith("INVALID") == (not row["valid"])


# --------------------------------------------------------------------------- pinning
@given(st.frozensets(st.integers(0, 300), min_size=1))
def test_cpu_lists_round_trip(cpus: frozenset[int]) -> None:
    text = peers.format_cpus(cpus)
    assert peers.parse_cpus(text) == cpus
    assert " " not in text


def test_cpu_list_forms_and_errors() -> None:
    assert peers.parse_cpus("0-2,5") == {0, 1, 2, 5}
    assert peers.format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    for bad in ("", "a", "3-1", "-1", "1-"):
        with pytest.raises(ValueError, match="not a CPU list"):
            peers.parse_cpus(bad)


def test_pin_tree_binds_every_thread_of_the_tree() -> None:
    # A parent with an extra thread and a child process: all three tasks must end up bound.
    code = (
        "import subprocess,sys,threading,time; "
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); "
        "subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            len(peers.process_tree(proc.pid)) < 2 or len(os.listdir(f"/proc/{proc.pid}/task")) < 2
        ):
            time.sleep(0.05)
        core = min(os.sched_getaffinity(0))
        assert peers.pin_tree(proc.pid, frozenset({core})) >= 3
        assert peers.tree_affinity(proc.pid) == {core}
        child = peers.process_tree(proc.pid)[1]
        assert os.sched_getaffinity(child) == {core}
    finally:
        for pid in reversed(peers.process_tree(proc.pid)):
            os.kill(pid, 9)
        proc.wait()


def test_overlapping_or_unavailable_cores_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        compare.parse_args(["--router-cpus", "0", "--fleet-cpus", "0"])
    assert "overlap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--router-cpus", "4096"])
    assert "may use cores" in capsys.readouterr().err
    args = compare.parse_args(["--no-pin", "--speedup", "4"])
    assert args.router_cpu_set is None and args.time_scale == 0.25


# --------------------------------------------------------------------------- lag and validity
INF = float("inf")


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    b = ((0.001, 50.0), (0.002, 99.0), (0.005, 100.0), (INF, 100.0))
    assert compare.histogram_quantile(b, 0.99) == pytest.approx(0.002)
    assert compare.histogram_quantile(b, 0.5) == pytest.approx(0.001)
    # rank 25 of 50 in the first bucket: halfway from 0 to 1 ms.
    assert compare.histogram_quantile(b, 0.25) == pytest.approx(0.0005)
    # rank 99.5: halfway through the 2..5 ms bucket.
    assert compare.histogram_quantile(b, 0.995) == pytest.approx(0.0035)
    # In the +Inf bucket: the largest finite bound; nothing observed: None.
    assert compare.histogram_quantile(((0.001, 1.0), (INF, 10.0)), 0.99) == 0.001
    assert compare.histogram_quantile(((0.001, 0.0), (INF, 0.0)), 0.99) is None
    assert compare.histogram_quantile((), 0.99) is None


def _pod_page(lags: list[float], requests: int) -> str:
    reg = CollectorRegistry()
    h = Histogram(
        compare.STEP_LAG_METRIC.removesuffix("_seconds") + "_seconds",
        "lag",
        registry=reg,
        buckets=STEP_LAG_BUCKETS,
    )
    for x in lags:
        h.observe(x)
    from prometheus_client import Counter

    c = Counter(compare.REQUESTS_METRIC, "ok", ("finished_reason",), registry=reg)
    c.labels("length").inc(requests)
    return generate_latest(reg).decode()


def test_step_lag_p99_is_the_worst_pods_over_the_run_only() -> None:
    # Pod A: 200 early steps 5 ms late (before the run), then 99 on time and 1 at 40 ms.
    # Pod B: 3% of its steps 4 ms late. The run's figure is pod B's p99, within 3..5 ms.
    a0 = compare.parse_pod_metrics(_pod_page([0.005] * 200, 2))
    a1 = compare.parse_pod_metrics(_pod_page([0.005] * 200 + [0.00005] * 99 + [0.04], 9))
    b0 = compare.parse_pod_metrics(_pod_page([], 0))
    b1 = compare.parse_pod_metrics(_pod_page([0.0002] * 97 + [0.004] * 3, 5))
    da, db = a1.delta(a0), b1.delta(b0)
    assert (da.requests, db.requests) == (7, 5)
    assert compare.histogram_quantile(da.lag_buckets, 0.99) <= 0.0001
    worst = compare.step_lag_p99_ms([da, db])
    assert worst is not None and 3.0 < worst <= 5.0
    assert compare.step_lag_p99_ms([b0.delta(b0)]) is None


def test_lag_verdict_bounds_the_worst_part() -> None:
    assert compare.lag_verdict(1.9, 0.4, 1.2, 2.0) == (1.9, True)
    assert compare.lag_verdict(0.5, 0.4, 2.0, 2.0) == (2.0, True)
    assert compare.lag_verdict(0.5, 2.5, 1.0, 2.0) == (2.5, False)
    # Nothing shows the pods kept time (no step ran): not valid.
    assert compare.lag_verdict(None, 0.1, 0.1, 2.0) == (0.1, False)
    assert compare.lag_verdict(0.1, None, None, 2.0) == (0.1, False)


def _row(router: str, p95: float, valid: bool, **kw: object) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(compare.RUN_FIELDS)
    row.update(router=router, workload="w", ttft_p95_s=p95, valid=valid, failed=0)
    row.update(kw)
    return row


def test_invalid_runs_are_not_ranked() -> None:
    rows = [_row("a", 0.5, True), _row("b", 0.1, False), _row("c", 0.3, True)]
    rows.append(_row("d", 0.2, True, workload="other"))
    compare.rank_rows(rows)
    assert [r["rank"] for r in rows] == [2, None, 1, 1]
    table = compare.format_runs(
        [
            {**r, "ttft_p50_s": 0.1, "ttft_p99_s": 1.0, "tpot_p50_s": 0.01, "hit_rate": 0.5}
            | {"output_tokens_per_s": 1.0, "router_cpu_s": 1.0, "router_peak_rss_mb": 50.0}
            for r in rows
        ]
    )
    line_b = next(x for x in table.splitlines() if x.startswith("b "))
    assert line_b.rstrip().endswith("INVALID")


def test_repeats_leave_out_invalid_runs_when_most_are_valid() -> None:
    base = {"hit_rate": 0.5, "ttft_p50_s": 0.1, "ttft_p99_s": 1.0}

    def run(p95: float, valid: bool, lag: float, pods: list[int]) -> compare.RunResult:
        row = _row("a", p95, valid, lag_p99_ms=lag, step_lag_p99_ms=lag, pod_requests=pods)
        return compare.RunResult(row | base)

    runs = [run(0.4, True, 1.0, [3, 1]), run(0.2, False, 3.0, [1, 3]), run(0.3, True, 1.5, [2, 2])]
    row = compare.median_row(runs)
    # the valid runs' median and worst lag; the invalid run's requests still counted
    assert row["ttft_p95_s"] == pytest.approx(0.35)
    assert row["lag_p99_ms"] == 1.5 and row["valid"] is True
    assert (row["runs"], row["valid_runs"]) == (3, 2)
    assert row["pod_requests"] == [6, 6]
    # one valid run of three: the row is invalid, over every run
    runs[2] = run(0.3, False, 2.5, [2, 2])
    row = compare.median_row(runs)
    assert row["ttft_p95_s"] == pytest.approx(0.3)
    assert row["lag_p99_ms"] == 3.0 and row["valid"] is False
    assert (row["runs"], row["valid_runs"]) == (3, 1)


async def test_loop_lag_probe_sees_a_blocked_loop() -> None:
    probe = LoopLagProbe(asyncio.get_running_loop(), interval_s=0.002)
    await asyncio.sleep(0.05)
    time.sleep(0.04)  # the loop is stuck for 40 ms: a probe posted meanwhile waits
    await asyncio.sleep(0.05)
    samples = probe.stop()
    assert len(samples) >= 10
    assert max(samples) >= 0.03
    assert min(samples) >= 0.0
    assert not any(t.name == "loop-lag-probe" and t.is_alive() for t in threading.enumerate())


# --------------------------------------------------------------------------- validation
def test_agreement_in_points() -> None:
    peer = {"pod_requests": [30, 30, 20, 20], "hit_rate": 0.80, "valid": True}
    ours = {"pod_requests": [34, 26, 20, 20], "hit_rate": 0.775, "valid": False}
    a = validate_peers.agreement(peer, ours, 5.0, 3.0)
    assert a["share_diff_pts"] == [4.0, -4.0, 0.0, 0.0]
    assert a["hit_diff_pts"] == -2.5
    assert a["agree"] and not a["both_valid"]
    b = validate_peers.agreement(peer, {**ours, "pod_requests": [36, 24, 20, 20]}, 5.0, 3.0)
    assert not b["share_ok"] and b["hit_ok"] and not b["agree"]
    with pytest.raises(ValueError, match="pod counts"):
        validate_peers.agreement(peer, {**ours, "pod_requests": [1, 2]}, 5.0, 3.0)


def test_policy_configs_run_on_the_fleets_blocks() -> None:
    fleet_doc = {
        "pods": [{"endpoint": "127.0.0.1:1", "models": ["m"]}],
        "blocks": {"mode": "tokens", "tokenizer_path": peers.BUNDLED_TOKENIZER, "block_size": 16},
    }
    vllm = parse_config(peers.policy_config(fleet_doc, "vllm-kv-aware"))
    assert vllm.blocks.mode == "tokens"
    assert [p.type for p in vllm.plugins] == ["vllm-kv-aware", "max-score-picker"]
    sglang = parse_config(peers.policy_config(fleet_doc, "sglang-cache-aware"))
    assert sglang.blocks.mode == "chars"
    assert sglang.plugins[0].type == "sglang-cache-aware"
    with pytest.raises(peers.RouterError, match=r"known:.*sglang-cache-aware"):
        peers.policy_config(fleet_doc, "nginx")


def test_self_spread_is_the_widest_pod_share_range() -> None:
    assert validate_peers.self_spread_pts([[10, 10]]) is None
    # Shares (50, 50), (70, 30), (40, 60): pod 0 ranges 40..70 = 30 points, pod 1 too.
    assert validate_peers.self_spread_pts([[10, 10], [14, 6], [8, 12]]) == 30.0


def test_fleet_core_busy_share_sees_a_busy_loop_on_that_core() -> None:
    core = min(os.sched_getaffinity(0))
    before = compare.cpu_busy_ticks(frozenset({core}))
    assert before is not None and 0 <= before[0] <= before[1]
    spinner = subprocess.Popen(
        ["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"]
    )
    try:
        time.sleep(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    share = compare.busy_share(before, compare.cpu_busy_ticks(frozenset({core})))
    assert share is not None and 0.9 <= share <= 1.0
    assert compare.busy_share(None, before) is None
    assert compare.cpu_busy_ticks(None) is None
