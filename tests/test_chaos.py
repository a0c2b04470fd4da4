"""The chaos harness (benchmarks/chaos.py) end to end, briefly: a 2-pod emulated fleet behind
`kvroute proxy`, steady load, one short fault and a short soak. Pins the JSON contract the
lead's 600 s run relies on, and that no request hangs or goes unanswered."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FACE_KEYS = {"face", "sent", "completed", "failed", "hung", "lost", "to_dead_pod", "faults"}
SOAK_KEYS = {"seconds", "rss_mb_start", "rss_mb_end", "fds_start", "fds_end", "loop_lag_p99_ms"}


async def test_chaos_run_reports_the_contract_and_nothing_hung_or_lost() -> None:
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--face", "proxy", "--pods", "2",
        "--concurrency", "3", "--faults", "error-503", "--hold-s", "1.5", "--settle-s", "1",
        "--warmup-s", "1", "--soak-s", "3", "--soak-fault-every-s", "60", "--json",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one JSON object"
    report = json.loads(lines[0])

    (face,) = report["faces"]
    assert set(face) >= FACE_KEYS
    assert face["face"] == "proxy"
    assert face["hung"] == 0 and face["lost"] == 0
    assert face["sent"] > 0 and face["completed"] > 0
    assert face["sent"] >= face["completed"] + sum(face["failed"].values())
    assert all(isinstance(k, str) and v > 0 for k, v in face["failed"].items())
    (fault,) = face["faults"]
    assert fault["fault"] == "error-503"
    assert fault["failed"] >= 0 and fault["recover_s"] >= 0

    soak = report["soak"]
    assert set(soak) >= SOAK_KEYS
    assert soak["seconds"] == 3
    assert soak["rss_mb_start"] > 0 and soak["rss_mb_end"] > 0
    assert soak["fds_start"] > 0 and soak["fds_end"] > 0
    assert soak["loop_lag_p99_ms"] is not None and soak["loop_lag_p99_ms"] >= 0
    assert [f["fault"] for f in soak["faults"]] == ["error-503"]
