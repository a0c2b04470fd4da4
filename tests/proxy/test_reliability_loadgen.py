"""`kvroute loadgen` stopped with SIGTERM prints the summary of what it finished (issue 18)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def test_loadgen_stopped_by_sigterm_prints_its_partial_summary(make_pod, until):
    pod = await make_pod(token_delay_s=0.01)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", "loadgen", "--url", f"http://{pod.endpoint}",
        "--model", "m", "--requests", "400", "--concurrency", "4", "--max-tokens-cap", "10",
        "--json", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        # Generous: on a loaded shared machine the CLI takes seconds to import.
        await until(lambda: pod.completed >= 8, timeout_s=120)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err.decode()[-2000:]
    summary = json.loads(out)
    assert summary["interrupted"] is True and summary["planned"] == 400
    # What it finished, no more: every request the pod completed before the signal is there.
    assert 8 <= summary["requests"] < 400
    assert summary["failed"] == 0 and summary["output_tokens"] == 10 * summary["requests"]
    assert b"stopped by a signal" in err
