"""`kvroute serve` as a process: binds its three ports, reports ready, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from envoy_extproc.server import EXT_PROC_SERVICE

CONFIG = """\
pods:
  - {endpoint: '127.0.0.1:9', models: [m]}
"""


async def test_serve_reports_ready_serves_metrics_and_exits_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router.cli",
        "serve",
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--lame-duck",
        "0",
        "--grace-period",
        "1",
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stderr is not None
        line = ""
        async with asyncio.timeout(15):
            while "ext_proc :" not in line:
                line = (await proc.stderr.readline()).decode()
                assert line, "kvroute serve exited before it was ready"
        m = re.search(r"ext_proc :(\d+), health :(\d+), metrics :(\d+), 1 pods", line)
        assert m, line
        _grpc_port, health_port, metrics_port = (int(x) for x in m.groups())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("readiness", "liveness", EXT_PROC_SERVICE):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
        async with httpx.AsyncClient() as c:
            page = (await c.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert "kvroute_pool_pods 1.0" in page
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_with_a_bad_config_exits_2_naming_the_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text("pods: [{endpoint: nope}]\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router.cli",
        "serve",
        "--config",
        str(cfg),
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"pods[0].endpoint" in err
