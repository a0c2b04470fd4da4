"""Smoke test of benchmarks/compare.py's plumbing: tiny fleet, tiny load, the JSON contract.

Runs the two kvroute routers (and the peers when their packages are installed) on a 2-pod
emulated fleet with a handful of multi-turn requests and a short raw-overhead run, then checks
the `--json` object has every contract field, the counts add up and the /proc accounting saw
the router. Speed is not asserted here (benchmarks measure it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare
import peers

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
    from router.config import parse_config

    cfg = parse_config(text)
    assert [p.name for p in cfg.profiles] == ["default", "round-robin"]


def test_unknown_router_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        compare.parse_args(["--routers", "kvroute,nginx"])
    assert e.value.code == 2
    assert "nginx" in capsys.readouterr().err


def test_compare_writes_the_contract_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    routers = ["kvroute", "kvroute-round-robin"]
    routers += [
        r for r in ("sglang-round_robin", "vllm-cache_aware") if not peers.ROUTERS[r].missing()
    ]
    cmd = [
        sys.executable, str(BENCH / "compare.py"), "--workload", "multi-turn", "--pods", "2",
        "--requests", "12", "--concurrency", "4", "--speedup", "8", "--max-tokens", "8",
        "--overhead-requests", "300", "--overhead-concurrency", "16",
        "--routers", ",".join(routers), "--json", str(out), "--plot", str(tmp_path / "plots"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["router"] for r in result["runs"]] == routers
    for row in result["runs"]:
        assert set(row) == RUN_KEYS
        assert row["workload"] == "multi-turn"
        assert row["failed"] == 0
        assert 0.0 <= row["hit_rate"] <= 1.0
        assert row["ttft_p50_s"] <= row["ttft_p95_s"] <= row["ttft_p99_s"]
        assert row["router_cpu_s"] > 0 and row["router_peak_rss_mb"] > 10
    assert [o["router"] for o in result["overhead"]] == routers
    for o in result["overhead"]:
        assert set(o) == OVERHEAD_KEYS and o["rps"] > 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "ttft_p95.png",
        "hit_rate.png",
        "ttft_cdf_multi-turn.png",
    }
    # The printed table names every router.
    for r in routers:
        assert r in done.stdout
