"""Streams a pod breaks after the client got its 200 (issue 18): a pod stopped with SIGSTOP
mid-stream, and one that drops the connection. Emulator pods as separate processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import httpx

from router.config import parse_config
from router.emulator.fleet import EmulatedFleet
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings

SETTINGS = ProxySettings(health_interval_s=0.05, first_byte_timeout_s=10, total_timeout_s=60)


def _config(fleet: EmulatedFleet) -> str:
    pods = "".join(f"  - {{endpoint: '{p.endpoint}', models: ['{p.model}']}}\n" for p in fleet.pods)
    return f"pods:\n{pods}prefix_index: {{mode: approximate}}\nscrape: {{interval_s: 0.2}}\n"


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_stopped_pod_ends_the_stream_after_the_idle_timeout():
    async with EmulatedFleet(pods=1, speedup=10, events="none") as fleet:
        pod = fleet.pods[0]
        settings = dataclasses.replace(SETTINGS, stream_idle_timeout_s=1.0)
        app = ProxyApp(parse_config(_config(fleet)), settings)
        body = {"model": pod.model, "prompt": "tell me a long story", "max_tokens": 400}
        chunks = 0
        stopped_at = ended_at = 0.0
        try:
            async with (
                RunningServer(app) as server,
                httpx.AsyncClient(base_url=server.url, timeout=30) as client,
            ):
                async with client.stream(
                    "POST", "/v1/completions", json=body | {"stream": True}
                ) as r:
                    assert r.status_code == 200
                    events = []
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        events.append(line[6:])
                        chunks += 1
                        if chunks == 5:
                            os.kill(pod.pid, signal.SIGSTOP)
                            stopped_at = time.monotonic()
                    ended_at = time.monotonic()
                metrics = (await client.get("/metrics")).text
        finally:
            os.kill(pod.pid, signal.SIGCONT)
        error = json.loads(events[-2])["error"]
        assert events[-1] == "[DONE]"
        assert error["code"] == 504 and error["type"] == "GatewayTimeoutError"
        assert "stopped sending in the middle of the response" in error["message"]
        assert pod.endpoint in error["message"]
        # Chunks already in flight may still arrive; the stream ends about 1 s after.
        assert 0.9 <= ended_at - stopped_at < 5.0
        assert _metric(metrics, 'kvroute_proxy_stream_errors_total{reason="idle_timeout"}') == 1
        # Counted as the 200 the client saw.
        assert f'kvroute_proxy_requests_total{{model="{pod.model}",status="200"}} 1.0' in metrics


async def test_a_pod_dropping_the_stream_is_reported_in_plain_words():
    async with EmulatedFleet(pods=1, speedup=20, events="none", admin=True) as fleet:
        pod = fleet.pods[0]
        app = ProxyApp(parse_config(_config(fleet)), SETTINGS)
        body = {"model": pod.model, "prompt": "once upon a time", "max_tokens": 20, "stream": True}
        async with (
            RunningServer(app) as server,
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        ):
            await client.post(f"{pod.admin_url}/admin/faults", json={"crash_after_tokens": 3})
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = [x[6:] async for x in r.aiter_lines() if x.startswith("data: ")]
            metrics = (await client.get("/metrics")).text
        error = json.loads(events[-2])["error"]
        assert error == {
            "message": f"the model server {pod.endpoint} closed the connection before the "
            "response was complete",
            "type": "BadGatewayError",
            "param": None,
            "code": 502,
        }
        assert "Payload" not in events[-2] and "aiohttp" not in events[-2]
        assert _metric(metrics, 'kvroute_proxy_stream_errors_total{reason="pod_closed"}') == 1
        assert f'kvroute_proxy_requests_total{{model="{pod.model}",status="200"}} 1.0' in metrics
        assert 'status="502"' not in metrics
