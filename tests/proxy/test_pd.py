"""P/D two-phase flow through the proxy (vLLM NixlConnector protocol)."""

from __future__ import annotations

import json

from router.proxy.pd import decode_body, prefill_body

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "summarize this long document " * 20}],
    "max_tokens": 5,
    "max_completion_tokens": 5,
    "min_tokens": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def test_prefill_body_asks_for_remote_decode_of_one_token_without_streaming():
    body = prefill_body(CHAT)
    assert body["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    assert body["stream"] is False
    assert body["max_tokens"] == 1 and body["max_completion_tokens"] == 1
    assert "stream_options" not in body and "min_tokens" not in body
    assert CHAT["stream"] is True and "kv_transfer_params" not in CHAT  # original untouched


def test_decode_body_carries_the_prefill_answer_params():
    params = {"do_remote_prefill": True, "remote_block_ids": [4, 5]}
    assert json.loads(decode_body(CHAT, params))["kv_transfer_params"] == params
    assert "kv_transfer_params" not in json.loads(decode_body(CHAT, None))


async def test_two_phase_request_prefills_on_one_pod_and_decodes_on_the_other(pods, proxy):
    prefill, decode = pods
    async with proxy(pods, roles=["prefill", "decode"]) as (_app, client):
        async with client.stream(
            "POST", "/v1/chat/completions", json=CHAT, headers={"x-kvroute-debug": "1"}
        ) as r:
            decision = json.loads(r.headers["x-kvroute-decision"])
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        metrics = (await client.get("/metrics")).text
    assert decision["pick"] == decode.endpoint and decision["prefill"] == prefill.endpoint
    assert events[-1] == "data: [DONE]" and len(events) == 7  # 5 tokens, usage, [DONE]
    [leg1] = prefill.received
    assert leg1.body["kv_transfer_params"]["do_remote_decode"] is True
    assert leg1.body["stream"] is False and leg1.body["max_tokens"] == 1
    [leg2] = decode.received
    assert leg2.body["kv_transfer_params"]["remote_engine_id"] == f"engine-{prefill.port}"
    assert leg2.body["kv_transfer_params"]["do_remote_prefill"] is True
    assert leg2.body["stream"] is True and leg2.body["max_tokens"] == 5
    assert leg2.body["stream_options"] == {"include_usage": True}
    assert 'kvroute_proxy_pd_requests_total{outcome="two_phase"} 1.0' in metrics


async def test_failed_prefill_leg_falls_back_to_local_prefill_and_is_counted(pods, proxy):
    prefill, decode = pods
    prefill.mode = "prefill_fails"
    async with proxy(pods, roles=["prefill", "decode"]) as (_app, client):
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": False})
        metrics = (await client.get("/metrics")).text
        assert r.status_code == 200
        assert r.json()["served_by"] == decode.endpoint
        assert "kv_transfer_params" not in decode.received[0].body
        assert 'kvroute_proxy_pd_requests_total{outcome="prefill_failed"} 1.0' in metrics
        prefill.mode = "ok"
        r2 = await client.post("/v1/chat/completions", json={**CHAT, "stream": False})
        assert r2.status_code == 200
