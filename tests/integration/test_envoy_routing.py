"""Through a real Envoy, in each request-body mode: requests go where the picker says."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from envoy_stack import MODES, StackFactory, chat, requires_envoy

from envoy_extproc.messages import DESTINATION_HEADER, PREFILLER_HEADER

pytestmark = requires_envoy


@pytest.mark.parametrize("mode", MODES)
async def test_request_lands_on_the_pod_the_picker_chose(
    envoy_stack: StackFactory, mode: str
) -> None:
    async with envoy_stack(mode) as s:
        for i in range(6):
            r = await s.client.post("/v1/chat/completions", json=chat(f"question {i} " * 50))
            assert r.status_code == 200, r.text
            served = r.json()["served_by"]
            assert served == s.decisions[-1].target
            assert r.json()["headers"][DESTINATION_HEADER] == served
        assert len(s.decisions) == 6
        # Every pod got exactly the requests the picker sent it.
        for pod in s.pods:
            assert len(pod.received) == sum(d.target == pod.endpoint for d in s.decisions)


@pytest.mark.parametrize("mode", MODES)
async def test_repeated_prefix_sticks_to_the_pod_that_holds_it(
    envoy_stack: StackFactory, mode: str
) -> None:
    system = "You are a careful assistant. " * 120
    async with envoy_stack(mode) as s:
        first = await s.client.post("/v1/chat/completions", json=chat(system + "first"))
        holder = first.json()["served_by"]
        for i in range(5):
            r = await s.client.post("/v1/chat/completions", json=chat(system + f"turn {i}"))
            assert r.json()["served_by"] == holder
        assert s.decisions[-1].results[s.decisions[-1].profile].pods
        hit = next(
            p.prefix_hit
            for p in s.decisions[-1].results[s.decisions[-1].profile].pods
            if p.endpoint == holder
        )
        assert hit > 0.9


@pytest.mark.parametrize("mode", MODES)
async def test_streaming_response_arrives_chunk_by_chunk(
    envoy_stack: StackFactory, mode: str
) -> None:
    async with envoy_stack(mode, chunk_interval_s=0.15) as s:
        body = chat("stream please", stream=True, stream_options={"include_usage": True})
        arrivals: list[float] = []
        text = b""
        t0 = time.perf_counter()
        async with s.client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for piece in r.aiter_raw():
                arrivals.append(time.perf_counter() - t0)
                text += piece
        assert text.endswith(b"data: [DONE]\n\n")
        assert text.count(b'"served_by"') == 4
        # The pod spaces its 4 chunks 0.15 s apart: the first must arrive well before the end.
        assert len(arrivals) >= 4
        assert arrivals[-1] - arrivals[0] >= 0.4
        decision = s.decisions[-1]
        # Envoy closes the ext_proc stream as the HTTP stream ends, just after the client's
        # last byte: the picker settles a moment later.
        for _ in range(100):
            if decision._done:
                break
            await asyncio.sleep(0.02)
        assert decision._done
        metrics = s.picker.metrics.registry
        tokens = metrics.get_sample_value("kvroute_output_tokens_sum", {"model": "test-model"})
        if mode == "FULL_DUPLEX_STREAMED":
            # The body passes through the picker: it read the usage of the last chunk.
            assert tokens == 4
        else:
            # response_body_mode NONE: the picker settles on the response headers (status 200)
            # and never sees the body, so no usage, and a picker death cannot cut it.
            assert tokens is None
            assert (
                metrics.get_sample_value(
                    "kvroute_requests_total",
                    {"model": "test-model", "profile": decision.profile, "result": "ok"},
                )
                == 1
            )
        assert s.picker.registry[decision.target].inflight_requests == 0


@pytest.mark.parametrize("mode", MODES)
async def test_malformed_body_gets_400_from_the_picker(
    envoy_stack: StackFactory, mode: str
) -> None:
    async with envoy_stack(mode) as s:
        r = await s.client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_json"
        r = await s.client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "missing_field"
        r = await s.client.post("/v1/chat/completions", json=chat("hi") | {"model": "nope"})
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found_error"
        assert all(not p.received for p in s.pods)
        assert not s.decisions


@pytest.mark.parametrize("mode", MODES)
async def test_spoofed_routing_headers_are_overwritten(
    envoy_stack: StackFactory, mode: str
) -> None:
    async with envoy_stack(mode) as s:
        for spoof in ("127.0.0.1:1", s.pods[0].endpoint, s.pods[1].endpoint):
            r = await s.client.post(
                "/v1/chat/completions",
                json=chat(f"spoof {spoof} " * 30),
                headers={DESTINATION_HEADER: spoof, PREFILLER_HEADER: "6.6.6.6:6"},
            )
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["served_by"] == s.decisions[-1].target
            assert got["headers"][DESTINATION_HEADER] == got["served_by"]
            assert PREFILLER_HEADER not in got["headers"]


@pytest.mark.parametrize("mode", MODES)
async def test_get_models_is_answered_by_the_picker_not_a_pod(
    envoy_stack: StackFactory, mode: str
) -> None:
    async with envoy_stack(mode) as s:
        s.picker.registry.set_health(s.pods[0].endpoint, False)
        s.picker.registry.set_health(s.pods[1].endpoint, False)
        r = await s.client.get("/v1/models", headers={DESTINATION_HEADER: s.pods[0].endpoint})
        assert r.status_code == 200
        assert r.json()["data"] == [{"id": "test-model", "object": "model", "owned_by": "kvroute"}]
        assert all(not p.received for p in s.pods)


async def test_no_ready_pod_gets_503_with_openai_error(envoy_stack: StackFactory) -> None:
    async with envoy_stack() as s:
        for p in s.pods:
            s.picker.registry.set_health(p.endpoint, False)
        r = await s.client.post("/v1/chat/completions", json=chat("anyone?"))
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
        r = await s.client.get("/v1/models")
        assert r.status_code == 503


@pytest.mark.parametrize("mode", MODES)
async def test_large_body_reaches_the_pod_whole(envoy_stack: StackFactory, mode: str) -> None:
    """3 MB, above Envoy's default 1 MiB buffer: the bootstraps raise the listener's buffer
    limit to the picker's max body size, so STREAMED (answers held) and BUFFERED both work."""
    async with envoy_stack(mode) as s:
        body = json.dumps(chat("many words " * 270_000)).encode()
        r = await s.client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text[:200]
        assert r.json()["body_bytes"] == len(body)
        assert r.json()["served_by"] == s.decisions[-1].target
