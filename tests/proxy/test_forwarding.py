"""The proxy's normal path: forwarding, streaming pass-through, headers, control endpoints."""

from __future__ import annotations

import json


def _chat(stream: bool = False, **extra: object) -> dict:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hello there, how are you doing today?"}],
        "max_tokens": 4,
        "stream": stream,
        **extra,
    }


async def test_non_streaming_chat_is_forwarded_and_answered(pods, proxy):
    async with proxy(pods) as (_app, client):
        r = await client.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "tok tok tok tok "
    assert body["served_by"] in {p.endpoint for p in pods}
    assert sum(len(p.received) for p in pods) == 1


async def test_streaming_completion_passes_every_chunk_through(pods, proxy):
    req = {
        "model": "m",
        "prompt": "abc " * 40,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        proxy(pods) as (_app, client),
        client.stream("POST", "/v1/completions", json=req) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    texts = [json.loads(e[6:]) for e in events[:-1]]
    assert [t["choices"][0]["text"] for t in texts if t["choices"]] == ["tok "] * 6
    assert texts[-1]["usage"]["completion_tokens"] == 6


async def test_spoofed_routing_headers_are_stripped_and_not_obeyed(pods, proxy):
    target, other = pods
    async with proxy(pods) as (_app, client):
        for _ in range(6):
            r = await client.post(
                "/v1/chat/completions",
                json=_chat(),
                headers={
                    "x-gateway-destination-endpoint": "169.254.169.254:80",
                    "x-prefiller-host-port": "169.254.169.254:80",
                },
            )
            assert r.status_code == 200
    received = target.received + other.received
    assert len(received) == 6
    for rec in received:
        lowered = {k.lower() for k in rec.headers}
        assert "x-gateway-destination-endpoint" not in lowered
        assert "x-prefiller-host-port" not in lowered
        assert "kv_transfer_params" not in rec.body


async def test_debug_header_returns_the_decision(pods, proxy):
    async with proxy(pods) as (_app, client):
        plain = await client.post("/v1/chat/completions", json=_chat())
        r = await client.post(
            "/v1/chat/completions", json=_chat(), headers={"x-kvroute-debug": "1"}
        )
    assert "x-kvroute-decision" not in plain.headers
    decision = json.loads(r.headers["x-kvroute-decision"])
    assert decision["pick"] == r.json()["served_by"]
    assert {p["pod"] for p in decision["top"]} == {p.endpoint for p in pods}


async def test_same_conversation_goes_back_to_the_pod_that_holds_its_prefix(pods, proxy):
    long_chat = _chat(messages=[{"role": "user", "content": "a long shared prompt " * 50}])
    async with proxy(pods) as (_app, client):
        served = {
            (await client.post("/v1/chat/completions", json=long_chat)).json()["served_by"]
            for _ in range(5)
        }
    assert len(served) == 1


async def test_control_endpoints(pods, proxy):
    async with proxy(pods) as (_app, client):
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/ready")
        assert ready.status_code == 200 and len(ready.json()["routable_pods"]) == 2
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["m"]
        await client.post("/v1/chat/completions", json=_chat())
        debug = (await client.get("/debug/pods")).json()["pods"]
        assert {d["endpoint"] for d in debug} == {p.endpoint for p in pods}
        assert sum(d["index_blocks"] for d in debug) > 0
        metrics = (await client.get("/metrics")).text
        assert 'kvroute_proxy_requests_total{model="m",status="200"} 1.0' in metrics
        missing = await client.get("/v1/nothing")
        assert missing.status_code == 404 and "error" in missing.json()


async def test_ready_is_503_when_no_pod_is_routable(pods, proxy):
    async with proxy(pods) as (app, client):
        for p in pods:
            app.registry.set_health(p.endpoint, False)
        r = await client.get("/ready")
    assert r.status_code == 503


async def test_unknown_model_is_404_in_openai_shape(pods, proxy):
    async with proxy(pods) as (_app, client):
        r = await client.post("/v1/chat/completions", json=_chat(model="nope"))
        ok = await client.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "NotFoundError" and r.json()["error"]["code"] == 404
    assert r.headers["x-kvroute-error"] == "model_not_found"
    assert ok.status_code == 200


async def test_no_routable_pod_is_503_and_service_resumes_when_one_returns(pods, proxy):
    async with proxy(pods) as (app, client):
        for p in pods:
            app.registry.set_health(p.endpoint, False)
        r = await client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        assert r.headers["retry-after"] == "1"
        app.registry.set_health(pods[0].endpoint, True)
        ok = await client.post("/v1/chat/completions", json=_chat())
    assert ok.status_code == 200 and ok.json()["served_by"] == pods[0].endpoint
