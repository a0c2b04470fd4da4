"""Fuzzing the picker's ext_proc stream handler (`ExternalProcessorServicer` → `ExtProcStream`)
with message sequences Envoy could send, over a real gRPC channel on 127.0.0.1.

Sequences mix, in any order: request headers (any method/path, with or without body, every
body mode), body chunks (valid bodies, random bytes, chunks after end_of_stream, one 10 MB
chunk), trailers, response headers/bodies with no request phase, and empty messages. Whatever
comes, every answer is a well-formed `ProcessingResponse` — a continue or a clear immediate
response — the stream ends with gRPC OK (no broken stream, no hang), the picker never reports
its own failure (`picker_error`, the servicer's answer to an unhandled exception), nothing is
logged as a crash, and no in-flight request is left counted once the stream is closed.

The gRPC server runs on an event loop in a background thread for the module, so each example
costs one stream, not a server start.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import msgspec
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from extproc_client import (
    FLEET,
    MODEL,
    body_msg,
    headers_msg,
    post_headers,
    response_body_msg,
    response_headers_msg,
    trailers_msg,
)
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from envoy_extproc.metrics import PickerMetrics
from envoy_extproc.picker import Picker
from envoy_extproc.servicer import ExternalProcessorServicer, add_to_server
from envoy_extproc.settings import ExtProcSettings
from router.config import parse_config
from router.scheduler import Scheduler
from tests.fuzz.conftest import FUZZ, assert_no_crash_logged

#: The production server's message limits (envoy_extproc/server.py), so 10 MB chunks pass.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
MODES = [
    ProcessingMode.NONE,
    ProcessingMode.STREAMED,
    ProcessingMode.BUFFERED,
    ProcessingMode.BUFFERED_PARTIAL,
    ProcessingMode.FULL_DUPLEX_STREAMED,
]
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 50}]}).encode()
COMPLETION = json.dumps({"model": MODEL, "prompt": "p" * 300, "stream": True}).encode()
TEN_MB = json.dumps({"model": MODEL, "prompt": "x" * (10 * 1024 * 1024)}).encode()
ANSWERS = {
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
    "immediate_response",
}


class PickerThread:
    """The servicer on a real gRPC server, on its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start())

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        # A large max body so the 10 MB chunk reaches the parse rather than the size check.
        config = parse_config(FLEET + "request:\n  max_body_bytes: 33554432\n")
        self.scheduler = Scheduler(config, seed=1)
        self.picker = Picker(self.scheduler, ExtProcSettings(), PickerMetrics())
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        add_to_server(ExternalProcessorServicer(self.picker), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)

    async def _stop(self) -> None:
        await self.channel.close()
        await self.server.stop(0)
        self.picker.tokenize.close()

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def exchange(self, messages: list[ProcessingRequest]) -> list[Any]:
        """Send every message, half-close, read every answer until the stream ends."""
        call = self.stub.Process()
        for m in messages:
            await call.write(m)
        await call.done_writing()
        answers = []
        async with asyncio.timeout(20):
            while (r := await call.read()) is not grpc.aio.EOF:
                answers.append(r)
            assert await call.code() == grpc.StatusCode.OK, await call.details()
        return answers

    @property
    def inflight(self) -> int:
        return sum(p.inflight_requests for p in self.scheduler.registry)


@pytest.fixture(scope="module")
def picker() -> Iterator[PickerThread]:
    p = PickerThread()
    yield p
    p.close()


# ------------------------------------------------------------------------------- strategies
method = st.sampled_from(["POST", "GET", "HEAD", "PUT", "", "post"])
path = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/metrics",
        "/",
        "",
        "/v1/completions?x=1",
    ]
)
chunk = st.one_of(
    st.sampled_from([CHAT, COMPLETION, b"", b"{", b"null"]),
    st.binary(max_size=200),
    st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
request_headers = st.builds(
    lambda m, p, end, mode, rmode, early, extra: headers_msg(
        {":method": m, ":path": p, "content-type": "application/json", **extra},
        end=end,
        mode=mode,
        response_mode=rmode,
        early_body=early,
    ),
    method,
    path,
    st.booleans(),
    st.one_of(st.none(), st.sampled_from(MODES)),
    st.sampled_from(MODES),
    st.booleans(),
    st.dictionaries(
        st.sampled_from(
            ["x-session-id", "x-kvroute-priority", "x-request-id", "x-gateway-destination-endpoint"]
        ),
        st.text(max_size=10),
        max_size=2,
    ),
)
message = st.one_of(
    request_headers,
    st.builds(body_msg, chunk, st.booleans()),
    st.just(trailers_msg()),
    st.builds(
        response_headers_msg,
        st.integers(min_value=0, max_value=999),
        st.sampled_from(["application/json", "text/event-stream", "text/plain", ""]),
        st.booleans(),
        st.one_of(st.none(), st.sampled_from(["10.0.0.1:8000", "1.2.3.4:5", ""])),
    ),
    st.builds(
        response_body_msg,
        st.one_of(
            chunk,
            st.just(b'data: {"usage": {"prompt_tokens": 1}}\n\n'),
            st.just(b"data: [DONE]\n\n"),
        ),
        st.booleans(),
    ),
    st.just(ProcessingRequest()),
)
FD = ProcessingMode.FULL_DUPLEX_STREAMED


def as_envoy_sends(messages: list[ProcessingRequest]) -> list[ProcessingRequest]:
    """The sequence cut where Envoy stops sending: after the response headers when the
    response body is not sent to the picker (body mode NONE). The servicer may end the stream
    there itself, and writing on would fail in the client, not in the picker."""
    mode = ProcessingMode.NONE
    out = []
    for m in messages:
        out.append(m)
        if m.HasField("protocol_config"):
            mode = m.protocol_config.response_body_mode
        if m.WhichOneof("request") == "response_headers" and mode == ProcessingMode.NONE:
            break
    return out


def check(picker: PickerThread, messages: list[ProcessingRequest]) -> None:
    answers = picker.call(picker.exchange(as_envoy_sends(messages)))
    for a in answers:
        kind = a.WhichOneof("response")
        assert kind in ANSWERS, a
        event(
            kind
            if kind != "immediate_response"
            else f"immediate {a.immediate_response.status.code}"
        )
        if kind == "immediate_response":
            status = a.immediate_response.status.code
            assert 200 <= status < 600
            error = (
                msgspec.json.decode(a.immediate_response.body).get("error")
                if status != 200
                else None
            )
            assert error is None or error["code"] != "picker_error", error
    assert picker.inflight == 0  # every routed request settled when its stream closed


@FUZZ
@given(messages=st.lists(message, max_size=8))
@example(messages=[headers_msg(post_headers(), end=True, mode=FD)])  # headers without body
@example(  # body chunks after end_of_stream, then trailers
    messages=[
        headers_msg(post_headers(), mode=FD, response_mode=FD),
        body_msg(CHAT, True),
        body_msg(b"more", False),
        body_msg(b"and more", True),
        trailers_msg(),
    ]
)
@example(  # a response phase with no request phase
    messages=[
        response_headers_msg(200, "text/event-stream"),
        response_body_msg(b"data: x\n\n", True),
    ]
)
@example(  # end of request in trailers, then a full response
    messages=[
        headers_msg(post_headers(), mode=ProcessingMode.STREAMED, early_body=True),
        body_msg(CHAT[:10], False),
        body_msg(CHAT[10:], False),
        trailers_msg(),
        response_headers_msg(503, "application/json"),
        response_body_msg(b"{}", True),
    ]
)
def test_any_message_sequence_gets_clear_answers(
    messages: list[ProcessingRequest], picker: PickerThread, caplog: pytest.LogCaptureFixture
) -> None:
    check(picker, messages)
    assert_no_crash_logged(caplog)


@settings(FUZZ, max_examples=4)  # each example moves 10 MB through gRPC twice
@given(
    mode=st.sampled_from([FD, ProcessingMode.BUFFERED, ProcessingMode.STREAMED]),
    chunk=st.sampled_from([TEN_MB, b"\xff" * (10 * 1024 * 1024)]),
)
def test_ten_megabytes_in_one_chunk_gets_an_answer(
    mode: int, chunk: bytes, picker: PickerThread, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [headers_msg(post_headers("/v1/completions"), mode=mode), body_msg(chunk, True)]
    answers = picker.call(picker.exchange(messages))
    assert answers, "no answer to a 10 MB body"
    kinds = [a.WhichOneof("response") for a in answers]
    if chunk is TEN_MB:  # valid JSON: routed (the body goes on), not refused
        assert "immediate_response" not in kinds, answers[-1].immediate_response.body[:200]
    else:  # not JSON: refused with 400 in OpenAI's shape
        assert answers[-1].immediate_response.status.code == 400
    assert picker.inflight == 0
    assert_no_crash_logged(caplog)
