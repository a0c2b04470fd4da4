"""The ext_proc servicer driven over a real gRPC channel, message by message as Envoy would."""

from __future__ import annotations

import asyncio
import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from extproc_client import (
    FLEET,
    MODEL,
    PODS,
    ExtProcHarness,
    body_msg,
    headers_msg,
    lb_metadata,
    post_headers,
    removed_headers,
    response_body_msg,
    response_headers_msg,
    set_headers,
    trailers_msg,
)

from envoy_extproc.messages import DESTINATION_HEADER, PREFILLER_HEADER
from envoy_extproc.settings import ExtProcSettings

FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
STREAMED = ProcessingMode.STREAMED
BUFFERED = ProcessingMode.BUFFERED


def chat_body(content: str = "hello there", **extra: object) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    ).encode()


async def test_full_duplex_holds_headers_then_routes_and_returns_the_whole_body() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        body = chat_body("x" * 3000)
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX, response_mode=FULL_DUPLEX))
        await call.write(body_msg(body[:1000], False))
        await call.write(body_msg(body[1000:], True))
        first = await call.read()
        # The first answer is the headers answer: nothing was sent before the body was whole.
        assert first.WhichOneof("response") == "request_headers"
        dest = set_headers(first)[DESTINATION_HEADER]
        assert dest in PODS
        assert lb_metadata(first) == {DESTINATION_HEADER: dest}
        assert first.request_headers.response.clear_route_cache
        assert PREFILLER_HEADER in removed_headers(first)
        second = await call.read()
        streamed = second.request_body.response.body_mutation.streamed_response
        assert streamed.body == body
        assert streamed.end_of_stream
        assert h.inflight == 1
        await call.done_writing()
        await call.read()  # end of stream
        assert h.inflight == 0  # closed without a response: settled as a failure
        assert [ep for _, ep in h.failures] == [dest]


async def test_destination_header_overwrites_a_client_value() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        await call.write(
            headers_msg(post_headers(**{DESTINATION_HEADER: "6.6.6.6:6"}), mode=FULL_DUPLEX)
        )
        await call.write(body_msg(chat_body(), True))
        first = await call.read()
        opt = first.request_headers.response.header_mutation.set_headers[0]
        assert opt.header.key == DESTINATION_HEADER
        assert opt.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        call.cancel()


async def test_full_duplex_body_ending_in_trailers_is_answered_in_order() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        body = chat_body()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX))
        await call.write(body_msg(body, False))
        await call.write(trailers_msg())
        kinds = [(await call.read()).WhichOneof("response") for _ in range(3)]
        assert kinds == ["request_headers", "request_body", "request_trailers"]
        call.cancel()


async def test_streamed_with_early_body_routes_in_headers_and_passes_each_chunk() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        body = chat_body("y" * 900)
        await call.write(headers_msg(post_headers(), mode=STREAMED, early_body=True))
        for i in range(3):
            await call.write(body_msg(body[i * 300 : (i + 1) * 300], False))
        await call.write(body_msg(body[900:], True))
        first = await call.read()
        assert first.WhichOneof("response") == "request_headers"
        assert set_headers(first)[DESTINATION_HEADER] in PODS
        for _ in range(4):
            r = await call.read()
            assert r.WhichOneof("response") == "request_body"
            assert not r.request_body.response.HasField("body_mutation")
            assert not r.request_body.response.header_mutation.set_headers
        call.cancel()


@pytest.mark.parametrize("mode", [BUFFERED, STREAMED])
async def test_headers_first_modes_route_in_the_first_body_answer(mode: int) -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        body = chat_body("z" * 400)
        await call.write(headers_msg(post_headers(**{PREFILLER_HEADER: "1.1.1.1:1"}), mode=mode))
        first = await call.read()
        assert first.WhichOneof("response") == "request_headers"
        assert set(removed_headers(first)) >= {DESTINATION_HEADER, PREFILLER_HEADER}
        chunks = [body] if mode == BUFFERED else [body[:200], body[200:]]
        for i, c in enumerate(chunks):
            await call.write(body_msg(c, i == len(chunks) - 1))
        answer = await call.read()
        dest = set_headers(answer)[DESTINATION_HEADER]
        assert dest in PODS
        assert answer.request_body.response.clear_route_cache
        assert lb_metadata(answer) == {DESTINATION_HEADER: dest}
        for _ in chunks[1:]:
            assert (await call.read()).WhichOneof("response") == "request_body"
        call.cancel()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{oops", 400, "invalid_json"),
        (json.dumps({"messages": []}).encode(), 400, "missing_field"),
        (chat_body().replace(b'"m"', b'"other"'), 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_an_immediate_openai_error(
    body: bytes, status: int, code: str
) -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX))
        await call.write(body_msg(body, True))
        r = await call.read()
        assert r.WhichOneof("response") == "immediate_response"
        assert r.immediate_response.status.code == status
        assert json.loads(r.immediate_response.body)["error"]["code"] == code
        ct = {o.header.key: o.header.raw_value for o in r.immediate_response.headers.set_headers}
        assert ct["content-type"] == b"application/json"
        assert h.inflight == 0
        # Client-chosen model names never become label values.
        errors = h.metrics.registry.get_sample_value(
            "kvroute_request_errors_total", {"model": "other", "kind": code}
        )
        assert errors == 1
        call.cancel()


async def test_no_healthy_pod_gets_503_and_unknown_path_404() -> None:
    async with ExtProcHarness() as h:
        for p in PODS:
            h.scheduler.registry.set_health(p, False)
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=BUFFERED))
        await call.read()
        await call.write(body_msg(chat_body(), True))
        r = await call.read()
        assert r.immediate_response.status.code == 503
        call.cancel()
        h.scheduler.registry.set_health(PODS[0], True)
        call = h.open()
        await call.write(headers_msg(post_headers("/v1/embeddings"), mode=FULL_DUPLEX))
        await call.write(body_msg(chat_body(), True))
        assert (await call.read()).immediate_response.status.code == 404
        call.cancel()


async def test_sheddable_request_is_refused_429_when_every_pod_is_saturated() -> None:
    async with ExtProcHarness() as h:
        for p in h.scheduler.registry:
            p.metrics.waiting = 100
        call = h.open()
        await call.write(
            headers_msg(post_headers(**{"x-kvroute-priority": "sheddable"}), mode=FULL_DUPLEX)
        )
        await call.write(body_msg(chat_body(), True))
        r = await call.read()
        assert r.immediate_response.status.code == 429
        assert json.loads(r.immediate_response.body)["error"]["type"] == "rate_limit_error"
        call.cancel()


async def test_body_over_the_limit_is_refused_413_before_the_end() -> None:
    config = FLEET + "request: {max_body_bytes: 1000}\n"
    async with ExtProcHarness(config_text=config) as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX))
        await call.write(body_msg(b"x" * 800, False))
        await call.write(body_msg(b"x" * 800, False))
        r = await call.read()
        assert r.immediate_response.status.code == 413
        call.cancel()


async def test_models_request_is_answered_by_the_picker_not_a_pod() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        await call.write(
            headers_msg({":method": "GET", ":path": "/v1/models"}, end=True, mode=FULL_DUPLEX)
        )
        r = await call.read()
        assert r.immediate_response.status.code == 200
        models = json.loads(r.immediate_response.body)["data"]
        assert [m["id"] for m in models] == sorted(h.scheduler.registry.models())
        call.cancel()


async def test_subset_hint_limits_the_candidates() -> None:
    async with ExtProcHarness() as h:
        hint = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": [PODS[1]]}}
        for _ in range(3):
            call = h.open()
            await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX, metadata=hint))
            await call.write(body_msg(chat_body(), True))
            assert set_headers(await call.read())[DESTINATION_HEADER] == PODS[1]
            call.cancel()
        call = h.open()
        none = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": ["9.9.9.9:1"]}}
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX, metadata=none))
        await call.write(body_msg(chat_body(), True))
        assert (await call.read()).immediate_response.status.code == 503
        call.cancel()


async def test_sse_response_is_echoed_in_full_duplex_and_its_usage_completes_the_request() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX, response_mode=FULL_DUPLEX))
        await call.write(body_msg(chat_body(stream=True), True))
        await call.read()
        await call.read()
        await call.write(response_headers_msg(200, "text/event-stream"))
        assert (await call.read()).WhichOneof("response") == "response_headers"
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        sse = (
            b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
            + f'data: {{"choices":[],"usage":{json.dumps(usage)}}}\n\n'.encode()
            + b"data: [DONE]\n\n"
        )
        pieces = [sse[:30], sse[30:70], sse[70:]]
        for i, piece in enumerate(pieces):
            await call.write(response_body_msg(piece, i == len(pieces) - 1))
            echoed = (await call.read()).response_body.response.body_mutation.streamed_response
            assert echoed.body == piece
            assert echoed.end_of_stream == (i == len(pieces) - 1)
        assert h.completions[-1][1] == usage
        assert h.inflight == 0
        assert (
            h.metrics.registry.get_sample_value("kvroute_output_tokens_sum", {"model": MODEL}) == 3
        )
        call.cancel()


async def test_upstream_5xx_is_a_failure_of_the_endpoint_envoy_reports_served() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=BUFFERED, response_mode=STREAMED))
        await call.read()
        await call.write(body_msg(chat_body(), True))
        await call.read()
        await call.write(response_headers_msg(503, "text/plain", served="10.9.9.9:8000"))
        await call.read()
        await call.write(response_body_msg(b"no healthy upstream", True))
        assert not (await call.read()).response_body.response.HasField("body_mutation")
        assert [ep for _, ep in h.failures] == ["10.9.9.9:8000"]
        assert h.inflight == 0
        call.cancel()


async def test_json_response_without_body_events_completes_when_the_stream_closes() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX))
        await call.write(body_msg(chat_body(), True))
        await call.read()
        await call.read()
        await call.write(response_headers_msg(200, "application/json"))
        await call.read()
        await call.done_writing()
        await call.read()
        assert len(h.completions) == 1 and h.completions[0][1] is None
        assert h.inflight == 0


async def test_client_going_away_mid_request_releases_the_pod() -> None:
    async with ExtProcHarness() as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX))
        await call.write(body_msg(chat_body(), True))
        await call.read()
        assert h.inflight == 1
        call.cancel()
        for _ in range(100):
            if h.inflight == 0:
                break
            await asyncio.sleep(0.01)
        assert h.inflight == 0
        assert len(h.failures) == 1


async def test_fallbacks_go_in_header_and_metadata_only_when_enabled() -> None:
    settings = ExtProcSettings(fallbacks_in_header=True)
    async with ExtProcHarness(settings=settings) as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX))
        await call.write(body_msg(chat_body(), True))
        r = await call.read()
        value = set_headers(r)[DESTINATION_HEADER]
        assert sorted(value.split(",")) == sorted(PODS)  # primary + 2 fallbacks
        assert lb_metadata(r) == {DESTINATION_HEADER: value}
        call.cancel()


PD_FLEET = """\
pods:
  - {endpoint: '10.1.0.1:8000', role: prefill, models: [m]}
  - {endpoint: '10.1.0.2:8000', role: decode, models: [m]}
plugins:
  - type: pd-profile-handler
    parameters: {threshold: 10}
  - type: decode-filter
  - type: prefill-filter
  - type: max-score-picker
schedulingProfiles:
  - name: decode
    plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}]
  - name: prefill
    plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}]
"""


async def test_pd_decision_sets_the_prefiller_header_for_the_decode_pod() -> None:
    async with ExtProcHarness(config_text=PD_FLEET) as h:
        call = h.open()
        await call.write(headers_msg(post_headers(), mode=FULL_DUPLEX))
        await call.write(body_msg(chat_body("long prompt " * 100), True))
        r = await call.read()
        hdrs = set_headers(r)
        assert hdrs == {DESTINATION_HEADER: "10.1.0.2:8000", PREFILLER_HEADER: "10.1.0.1:8000"}
        assert PREFILLER_HEADER not in removed_headers(r)
        assert lb_metadata(r) == {DESTINATION_HEADER: "10.1.0.2:8000"}
        call.cancel()


def test_timing_plugins_changes_no_decision() -> None:
    from envoy_extproc.metrics import PickerMetrics, time_plugins
    from router.config import parse_config
    from router.request import parse_request
    from router.scheduler import Scheduler

    config = parse_config(FLEET)
    plain, timed = Scheduler(config, seed=3), Scheduler(config, seed=3)
    metrics = PickerMetrics()
    time_plugins(timed, metrics)
    for i in range(20):
        body = chat_body(f"prompt {i % 4} " * 40)
        a = plain.schedule(parse_request(body, "/v1/chat/completions"), now=float(i))
        b = timed.schedule(parse_request(body, "/v1/chat/completions"), now=float(i))
        assert (a.target, a.fallbacks) == (b.target, b.fallbacks)
        plain.on_pick(a, float(i))
        timed.on_pick(b, float(i))
    count = metrics.registry.get_sample_value(
        "kvroute_scheduler_plugin_duration_seconds_count",
        {"profile": "default", "plugin": "predicted-ttft-scorer", "kind": "scorer"},
    )
    assert count == 20
