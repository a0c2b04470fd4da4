"""`kvroute explain`, run as users run it: the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def kvroute(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kvroute")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "router.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


PARTS = ("queued_prefill_s", "own_prefill_s", "decode_interference_s", "kv_pressure_s")


def test_explain_with_no_arguments_uses_bundled_example() -> None:
    out = kvroute("explain")
    assert out.returncode == 0, out.stderr
    assert "<- pick" in out.stdout and "predicted-ttft-scorer" in out.stdout
    for column in ("pred TTFT s", "queued prefill s", "own prefill s", "decode s", "kv penalty s"):
        assert column in out.stdout


def test_explain_json_contract() -> None:
    out = kvroute("explain", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["prefill_pick"] is None
    costs = {}
    for pod in data["pods"]:
        assert set(pod) >= {"endpoint", "prefix_hit", "scores", "total", "details"}
        parts = pod["details"]["predicted-ttft-scorer"]
        assert parts["predicted_ttft_s"] == pytest.approx(sum(parts[k] for k in PARTS), abs=1e-5)
        assert pod["total"] == pytest.approx(pod["scores"]["predicted-ttft-scorer"], abs=1e-5)
        costs[pod["endpoint"]] = parts["routing_cost_s"]
    # The pick is the pod with the lowest predicted cost; scores keep the cost ratios.
    assert data["pick"] == min(costs, key=costs.__getitem__)
    best = min(costs.values())
    for pod in data["pods"]:
        assert pod["total"] == pytest.approx(best / costs[pod["endpoint"]], rel=1e-3)
    # 10.0.0.1 holds the whole prompt but has six requests queued (the scrape): for this
    # 60-token prompt waiting behind them costs more than recomputing it on an idle pod.
    by_ep = {p["endpoint"]: p for p in data["pods"]}
    assert by_ep["10.0.0.1:8000"]["prefix_hit"] == 1.0
    assert by_ep["10.0.0.1:8000"]["details"]["predicted-ttft-scorer"]["queued_prefill_s"] > 0


def test_explain_routes_a_long_prompt_to_the_pod_holding_it(tmp_path: Path) -> None:
    prompt = "Manual section. " * 400 + "Question: how do I reset the password?"
    state = tmp_path / "state.yaml"
    state.write_text(
        json.dumps(
            {
                "model": "llama-3.1-8b",
                "prompt": prompt,
                "pods": {
                    "10.0.0.1:8000": {"holds": [prompt], "running": 20, "kv_utilization": 0.6},
                    "10.0.0.2:8000": {"holds": [], "waiting": 0, "running": 2},
                },
            }
        )
    )
    config = ROOT / "router" / "data" / "explain-config.yaml"
    out = kvroute("explain", "--config", str(config), "--state", str(state), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["pick"] == "10.0.0.1:8000"
    by_ep = {p["endpoint"]: p["details"]["predicted-ttft-scorer"] for p in data["pods"]}
    for ep in ("10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"):
        assert by_ep[ep]["own_prefill_s"] > by_ep["10.0.0.1:8000"]["predicted_ttft_s"]


def test_explain_pd_config_with_body_file(tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            {
                "model": "openai/gpt-oss-120b",
                "messages": [{"role": "user", "content": "long question " * 200}],
            }
        )
    )
    out = kvroute(
        "explain", "--config", str(ROOT / "configs" / "pd.yaml"), "--body", str(body), "--json"
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["pick"] in {"10.0.1.3:8000", "10.0.1.4:8000"}
    assert data["prefill_pick"] in {"10.0.1.1:8000", "10.0.1.2:8000"}


def test_explain_reports_bad_config_and_unknown_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pods:\n  - {endpoint: a:1, colour: red}\n")
    out = kvroute("explain", "--config", str(bad), "--prompt", "x")
    assert out.returncode == 2 and "colour" in out.stderr
    body = tmp_path / "b.json"
    body.write_text('{"model": "nope", "prompt": "x"}')
    out = kvroute("explain", "--config", str(ROOT / "configs" / "pd.yaml"), "--body", str(body))
    assert out.returncode == 1 and "404" in out.stderr
