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


def test_explain_with_no_arguments_uses_bundled_example() -> None:
    out = kvroute("explain")
    assert out.returncode == 0, out.stderr
    assert "<- pick" in out.stdout and "prefix-cache-scorer" in out.stdout


def test_explain_json_contract() -> None:
    out = kvroute("explain", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["pick"] == "10.0.0.1:8000"  # holds the whole prompt prefix
    assert data["prefill_pick"] is None
    for pod in data["pods"]:
        assert set(pod) >= {"endpoint", "prefix_hit", "scores", "total"}
        assert pod["total"] == pytest.approx(
            sum(v * w for v, w in zip(pod["scores"].values(), [3, 2, 1, 1], strict=True)),
            abs=1e-5,
        )


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
