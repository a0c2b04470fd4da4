"""Fleets of emulated pods as processes: health, config accepted by kvroute, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx

from router.config import load_config
from router.emulator.fleet import EmulatedFleet
from router.pods import Role


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_fleet_pods_are_healthy_and_the_config_loads(tmp_path: Path) -> None:
    async with EmulatedFleet(3, pd=(1, 2), speedup=20.0) as fleet:
        pids = [p.pid for p in fleet.pods]
        async with httpx.AsyncClient() as c:
            for pod in fleet.pods:
                assert (await c.get(f"{pod.url}/health")).status_code == 200
        path = tmp_path / "fleet.yaml"
        fleet.write_config(path)
        config = load_config(path)
    assert [p.role for p in config.pods] == [Role.PREFILL, Role.DECODE, Role.DECODE]
    assert [p.endpoint for p in config.pods] == [p.endpoint for p in fleet.pods]
    for pod in config.pods:
        assert pod.kv_events_endpoint and pod.kv_events_endpoint.startswith("tcp://127.0.0.1:")
        assert pod.kv_replay_endpoint and pod.kv_replay_endpoint.startswith("tcp://127.0.0.1:")
        assert pod.models == frozenset({"meta-llama/Llama-3.1-8B-Instruct"})
    await asyncio.sleep(0)
    assert not any(_alive(pid) for pid in pids)


async def test_fleet_cli_prints_ready_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router.emulator",
        "fleet",
        "--pods",
        "2",
        "--speedup",
        "10",
        "--write-config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines = []
    try:
        async with asyncio.timeout(30):
            while (line := (await proc.stdout.readline()).decode().strip()) != "ready":
                assert line, "fleet exited before ready"
                lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
    assert code == 0
    assert len(lines) == 2 and all("http://127.0.0.1:" in ln for ln in lines)
    config = load_config(path)
    assert len(config.pods) == 2
    async with httpx.AsyncClient() as c:
        for pod in config.pods:
            try:
                await c.get(f"http://{pod.endpoint}/health", timeout=0.5)
            except httpx.ConnectError:
                continue
            raise AssertionError(f"pod {pod.endpoint} still serving after the fleet exited")
