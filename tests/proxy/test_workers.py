"""`kvroute proxy --workers 2` as a real subprocess in front of loopback pods: both workers
serve, a SIGKILLed worker is replaced while requests keep succeeding, SIGTERM ends every
process."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from router.proxy.workers import Supervisor, bind_listener

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "m", "prompt": "hi", "max_tokens": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(x) for x in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _one_request(port: int) -> tuple[int, int]:
    """(status, worker pid) of one completion on a fresh connection."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        r = await client.post("/v1/completions", json=BODY)
        return r.status_code, int(r.headers.get("x-kvroute-worker", "0"))


async def _wait_ready(port: int, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"proxy on port {port} not ready after {timeout_s}s")


async def _pids_serving(port: int, want: set[int], timeout_s: float = 40.0) -> set[int]:
    """Worker pids seen answering fresh connections, until every pid of `want` was seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while not want <= seen and time.monotonic() < deadline:
        status, pid = await _one_request(port)
        assert status == 200
        seen.add(pid)
    return seen


@pytest.fixture
def config_file(pods, tmp_path: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(
        "pods:\n" + "".join(f"  - {{endpoint: '{p.endpoint}', models: [m]}}\n" for p in pods)
    )
    return path


async def test_two_workers_serve_survive_a_sigkill_and_stop_on_sigterm(config_file):
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", "proxy", "--config", str(config_file),
        "--port", str(port), "--workers", "2", "--log-level", "info",
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    workers: set[int] = set()
    try:
        await _wait_ready(port)
        workers = _children(proc.pid)
        assert len(workers) == 2
        # Both workers accept from the shared socket and answer.
        assert await _pids_serving(port, workers) == workers

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # Every request after the kill succeeds (the survivor takes them), and a replacement
        # worker appears and serves too.
        replaced: set[int] = set()
        deadline = time.monotonic() + 40
        served_by: set[int] = set()
        while time.monotonic() < deadline:
            status, pid = await _one_request(port)
            assert status == 200
            served_by.add(pid)
            replaced = _children(proc.pid) - workers
            if replaced and replaced <= served_by:
                break
            await asyncio.sleep(0.02)
        assert victim not in served_by
        assert len(replaced) == 1 and replaced <= served_by
        workers = _children(proc.pid)
        assert len(workers) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, stderr
    assert not [p for p in workers if _alive(p)]
    assert f"worker 0 (pid {victim}) died (signal SIGKILL)" in stderr or (
        f"(pid {victim}) died (signal SIGKILL)" in stderr
    )
    assert "without a shared_state: section" in stderr
    assert "all workers stopped" in stderr


def test_supervisor_restarts_a_crashing_worker_with_growing_backoff(tmp_path):
    """A worker that keeps exiting is restarted, each time later than the last."""
    marker = tmp_path / "starts"
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys, time\n"
        f"open({str(marker)!r}, 'a').write(f'{{time.monotonic()}}\\n')\n"
        "sys.exit(3)\n"
    )
    sock = bind_listener("127.0.0.1", 0)
    sup = Supervisor(1, sock, [])
    sup.command = lambda: [sys.executable, str(script)]  # type: ignore[method-assign]

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(2.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert sup.run() == 0
    finally:
        timer.cancel()
        for s, h in previous.items():
            signal.signal(s, h)
    starts = [float(x) for x in marker.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 0.2 s, 0.4 s, 0.8 s, ... between starts (plus interpreter start-up).
    assert len(starts) >= 3 and sup.restarts == len(starts) - 1
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[0] >= 0.2
    assert sock.fileno() == -1


async def test_workers_exit_when_the_supervisor_is_sigkilled(config_file):
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", "proxy", "--config", str(config_file),
        "--port", str(port), "--workers", "2", "--log-level", "warning", cwd=ROOT,
    )  # fmt: skip
    try:
        await _wait_ready(port)
        workers = _children(proc.pid)
        assert len(workers) == 2
        await _pids_serving(port, workers)  # both are up (prctl done) before the kill
    finally:
        proc.kill()
        await proc.wait()
    deadline = time.monotonic() + 15
    while [p for p in workers if _alive(p)] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    # Orphans are reparented and reaped by init; none keeps serving the port.
    assert not [p for p in workers if _alive(p)]
