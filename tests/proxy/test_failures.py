"""Every failure path: what the client sees, and that the proxy serves the next request."""

from __future__ import annotations

import asyncio
import json

import httpx

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hello there, how are you doing today?"}],
    "max_tokens": 4,
}


def _stream(n: int = 4) -> dict:
    return {**CHAT, "max_tokens": n, "stream": True}


async def _ok(client: httpx.AsyncClient) -> dict:
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    return r.json()


def _pod_state(app, endpoint: str):
    return app.registry.get(endpoint)


async def test_refused_connection_is_retried_on_the_next_pod_and_pod_ejected(pods, proxy, until):
    dead, alive = pods
    alive.waiting = 3  # the queue scorer makes the dead pod the first choice
    async with proxy(pods) as (app, client):
        await until(lambda: app.registry.get(alive.endpoint).metrics.waiting == 3)
        port = dead.port
        await dead.stop()
        assert (await _ok(client))["served_by"] == alive.endpoint
        assert not _pod_state(app, dead.endpoint).healthy
        assert dead.endpoint in app.prober.ejected
        assert 'kind="connect"' in (await client.get("/metrics")).text
        assert (await _ok(client))["served_by"] == alive.endpoint
        await dead.start(port)  # the same pod comes back on its port
        await until(lambda: _pod_state(app, dead.endpoint).healthy)
        assert (await client.get("/ready")).json()["routable_pods"].count(dead.endpoint) == 1


async def test_5xx_before_first_byte_is_retried_once_on_another_pod(pods, proxy, until):
    bad, good = pods
    bad.mode = "error500"
    good.waiting = 3  # the queue scorer makes the failing pod the first choice
    async with proxy(pods) as (app, client):
        await until(lambda: app.registry.get(good.endpoint).metrics.waiting == 3)
        assert (await _ok(client))["served_by"] == good.endpoint
        assert len(bad.received) == 1 and len(good.received) == 1
        metrics = (await client.get("/metrics")).text
        assert "kvroute_proxy_retries_total 1.0" in metrics
        assert 'kind="status_5xx"' in metrics
        assert (await _ok(client))["served_by"] == good.endpoint


async def test_5xx_on_every_pod_reaches_the_client_then_service_resumes(pods, proxy, until):
    for p in pods:
        p.mode = "error500"
    async with proxy(pods) as (app, client):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "engine crashed"
        assert sum(len(p.received) for p in pods) == 2  # first try + one retry
        for p in pods:
            p.mode = "ok"
        await until(lambda: all(_pod_state(app, p.endpoint).healthy for p in pods))
        await _ok(client)


async def test_pod_killed_mid_stream_ends_the_stream_with_an_error_event(make_pod, proxy, until):
    pod = await make_pod(mode="die_mid_stream")
    async with proxy([pod]) as (app, client):
        async with client.stream("POST", "/v1/chat/completions", json=_stream(6)) as r:
            assert r.status_code == 200
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert len(events) == 4  # two chunks, the error event, [DONE]
        assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "tok "
        error = json.loads(events[2][6:])["error"]
        assert error == {
            "message": f"the model server {pod.endpoint} closed the connection before the "
            "response was complete",
            "type": "BadGatewayError",
            "param": None,
            "code": 502,
        }
        assert events[3] == "data: [DONE]"
        # Counted as what the client saw (a 200), and the broken stream apart.
        metrics = (await client.get("/metrics")).text
        assert 'kvroute_proxy_requests_total{model="m",status="200"} 1.0' in metrics
        assert 'status="502"' not in metrics
        assert 'kvroute_proxy_stream_errors_total{reason="pod_closed"} 1.0' in metrics
        pod.mode = "ok"
        await until(lambda: _pod_state(app, pod.endpoint).healthy)
        await _ok(client)
        assert _pod_state(app, pod.endpoint).inflight_requests == 0


async def test_slow_pod_times_out_with_504_and_is_not_ejected(pods, proxy):
    slow = pods[0]
    slow.mode, slow.delay_s = "slow", 2.0
    async with proxy([slow], first_byte_timeout_s=0.3) as (app, client):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == 504
        assert r.json()["error"]["type"] == "GatewayTimeoutError"
        assert r.headers["x-kvroute-error"] == "timeout"
        assert _pod_state(app, slow.endpoint).healthy
        slow.mode = "ok"
        await _ok(client)


async def test_stream_past_the_total_timeout_ends_with_an_error_event(make_pod, proxy):
    pod = await make_pod(token_delay_s=0.2)
    async with proxy([pod], total_timeout_s=0.5) as (_app, client):
        async with client.stream("POST", "/v1/chat/completions", json=_stream(20)) as r:
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2][6:])["error"]["code"] == 504
        assert 1 < len(events) < 10
        pod.token_delay_s = 0.0
        await _ok(client)


async def test_client_disconnect_cancels_the_upstream_request(make_pod, proxy, until):
    pod = await make_pod(token_delay_s=0.05)
    async with proxy([pod]) as (app, client):
        async with client.stream("POST", "/v1/chat/completions", json=_stream(200)) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break
        await until(lambda: pod.client_gone == 1)
        await until(lambda: _pod_state(app, pod.endpoint).inflight_requests == 0)
        assert pod.completed == 0
        assert "kvroute_proxy_client_disconnects_total 1.0" in (await client.get("/metrics")).text
        pod.token_delay_s = 0.0
        await _ok(client)


async def test_client_disconnect_while_waiting_for_a_non_streaming_answer(make_pod, proxy, until):
    pod = await make_pod(mode="slow", delay_s=0.5)
    async with proxy([pod]) as (app, client):
        task = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await until(lambda: len(pod.received) == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await until(lambda: _pod_state(app, pod.endpoint).inflight_requests == 0)
        pod.mode = "ok"
        await _ok(client)


async def test_malformed_bodies_get_400_or_413_in_vllm_shape(pods, proxy):
    async with proxy(pods, extra_yaml="request: {max_body_bytes: 2000}\n") as (_app, client):
        cases = [
            (b"{not json", 400, "invalid_json"),
            (b"[1, 2]", 400, "invalid_json"),
            (b"", 400, "invalid_json"),
            (json.dumps({"messages": CHAT["messages"]}).encode(), 400, "missing_field"),
            (json.dumps({**CHAT, "messages": "hi"}).encode(), 400, "invalid_request"),
            (json.dumps({**CHAT, "max_tokens": -1}).encode(), 400, "invalid_request"),
            (b"{" + b" " * 3000 + b"}", 413, "body_too_large"),
        ]
        for raw, status, code in cases:
            r = await client.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            assert r.status_code == status, raw[:40]
            error = r.json()["error"]
            # vLLM's ErrorInfo: message, type (a class name), param, integer code.
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == status
            assert error["type"] == (
                "BadRequestError" if status == 400 else "RequestEntityTooLargeError"
            )
            assert r.headers["x-kvroute-error"] == code
        await _ok(client)
    assert sum(len(p.received) for p in pods) == 1


async def test_overload_gets_429_with_retry_after(make_pod, proxy):
    pod = await make_pod(mode="slow", delay_s=0.4)
    async with proxy([pod], max_inflight_per_model=1, max_queued_per_model=0) as (_a, client):
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.1)
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "RateLimitError"
        assert (await first).status_code == 200
        await _ok(client)


async def test_sheddable_requests_are_refused_first_when_the_queue_is_full(make_pod, proxy):
    pod = await make_pod(mode="slow", delay_s=0.4)
    shed = {"x-kvroute-priority": "sheddable"}
    async with proxy([pod], max_inflight_per_model=1, max_queued_per_model=1) as (_a, client):
        running = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.1)
        queued_shed = asyncio.create_task(
            client.post("/v1/chat/completions", json=CHAT, headers=shed)
        )
        await asyncio.sleep(0.05)
        # Queue full: another sheddable one is refused at once...
        r = await client.post("/v1/chat/completions", json=CHAT, headers=shed)
        assert r.status_code == 429 and r.headers["x-kvroute-error"] == "shed"
        # ...and a standard one takes the queued sheddable one's place.
        standard = await client.post("/v1/chat/completions", json=CHAT)
        displaced = await queued_shed
        assert displaced.status_code == 429 and displaced.headers["x-kvroute-error"] == "shed"
        assert standard.status_code == 200
        assert (await running).status_code == 200


async def test_sheddable_request_refused_when_every_pod_is_saturated(pods, proxy, until):
    for p in pods:
        p.waiting = 50
    async with proxy(pods) as (app, client):
        await until(lambda: all(app.registry.get(p.endpoint).metrics.waiting == 50 for p in pods))
        r = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-kvroute-priority": "sheddable"}
        )
        assert r.status_code == 429 and r.headers["x-kvroute-error"] == "shed"
        assert "retry-after" in r.headers
        await _ok(client)  # a standard request is still served
