"""Quiet logs: an idle `kvroute proxy` writes nothing after start-up at the default level
(benchmarks/idle_logs.py, run for a short window), and the access log is one line a request."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet
from router.proxy.app import ProxyApp, RunningServer

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "idle_logs.py"


def test_an_idle_proxy_logs_nothing_after_start_up():
    # 2 s idle at a 0.1 s scrape interval: 20 scrapes of each of 2 pods.
    args = ["--pods", "2", "--seconds", "2", "--scrape-interval", "0.1", "--json"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["idle_lines"] == []
    assert out.returncode == 0, out.stderr


async def test_the_access_log_is_off_by_default_and_one_line_a_request_when_on(caplog):
    caplog.set_level(logging.INFO, logger="kvroute.access")
    async with EmulatedFleet(pods=1, speedup=50, events="none") as fleet:
        pod = fleet.pods[0]
        pods = f"pods:\n  - {{endpoint: '{pod.endpoint}', models: ['{pod.model}']}}\n"
        body = {"model": pod.model, "prompt": "hello", "max_tokens": 2}
        for access in (False, True):
            config = parse_config(pods + f"logging: {{access_log: {str(access).lower()}}}\n")
            app = ProxyApp(config)
            async with (
                RunningServer(app) as server,
                httpx.AsyncClient(base_url=server.url, timeout=20) as client,
            ):
                assert (await client.post("/v1/completions", json=body)).status_code == 200
                assert (await client.get("/metrics")).status_code == 200
    records = [r for r in caplog.records if r.name == "kvroute.access"]
    assert len(records) == 1
    line = records[0]
    assert line.getMessage().startswith(f"POST /v1/completions 200 model={pod.model} pod=")
    assert (line.method, line.path, line.status) == ("POST", "/v1/completions", 200)
    assert (line.model, line.pod) == (pod.model, pod.endpoint)
    assert line.duration_ms > 0
