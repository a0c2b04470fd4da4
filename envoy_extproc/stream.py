"""ExtProcStream: the state machine of one ext_proc stream (one HTTP request through Envoy).

`handle(message)` takes each `ProcessingRequest` and returns the `ProcessingResponse`s to send
now (possibly none, when an answer is held back); `close()` settles the request's outcome when
the stream ends. No I/O: the servicer moves the messages.

Request side, by the body mode Envoy announces in `protocol_config`:
- FULL_DUPLEX_STREAMED: the headers answer is held; body chunks are collected until
  `end_of_stream` (or `request_trailers`); then (1) the headers answer with the routing
  mutation, `clear_route_cache` and the `envoy.lb` metadata, (2) the whole body handed back
  as one `streamed_response` (3) the trailers answer if the end came as trailers.
- STREAMED with `send_body_without_waiting_for_header_response`: the same hold, then the
  headers answer with the mutation and one pass-through answer per held chunk, in order.
- BUFFERED (and STREAMED without early body): headers are answered at once (client routing
  headers removed); the body answer carries the mutation, `clear_route_cache` and metadata.
- Path policy first, on the headers: only `request.routed_paths` (POST) reach a pod;
  `GET /v1/models` is answered by the picker, any other path or method gets 404/405 (OpenAI
  error JSON), with or without a body.
- A body holding router-only fields (`request.strip_fields`, e.g. `kv_transfer_params`) goes
  on without them, re-encoded: full-duplex mode streams the rewritten body back; STREAMED
  replaces the first held chunk with it and clears the others; BUFFERED replaces the body.
  The headers answer then sets `content-length` to the new length. Bodies without such
  fields go on byte for byte (the check is a few dict lookups on the parse the picker does
  anyway).

Response side: headers and body chunks are answered as they come (echoed in full-duplex
mode, empty otherwise); first-chunk time and usage are read on the side. With response body
mode NONE the stream is `finished` once the response headers are answered (the servicer then
ends it, so a picker death cannot cut the response). A 5xx Envoy tagged as "pod unreachable"
(`UPSTREAM_FAILURE_HEADER`, see the bootstraps) is reported as such, and the tag removed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from envoy_extproc import messages as msg
from envoy_extproc.passive_health import UPSTREAM_FAILURE_HEADER
from envoy_extproc.picker import Picker
from envoy_extproc.usage import UsageReader
from router.request import RequestError
from router.scheduler import Decision

_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
_STREAMED = ProcessingMode.STREAMED
_BUFFERED = ProcessingMode.BUFFERED
_encode = msgspec.json.Encoder().encode
_JSON_HEADERS = (("content-type", "application/json"),)


def error_response(error: RequestError) -> ProcessingResponse:
    """The client's answer to a refused request: status plus OpenAI error JSON."""
    return msg.immediate_response(error.status, _encode(error.to_json()), _JSON_HEADERS)


class ExtProcStream:
    __slots__ = (
        "_body",
        "_body_bytes",
        "_decision",
        "_first_token_seen",
        "_held_chunks",
        "_hold_headers",
        "_path",
        "_picker",
        "_request_body_mode",
        "_response_body_mode",
        "_response_bytes",
        "_response_headers_seen",
        "_routed",
        "_settled",
        "_started",
        "_status",
        "_subset",
        "_unreachable",
        "_usage",
        "clock",
        "headers",
        "served",
    )

    def __init__(self, picker: Picker, clock: Callable[[], float] = time.perf_counter) -> None:
        self._picker = picker
        self.clock = clock
        self.headers: dict[str, str] = {}
        self._path = ""
        self._subset: list[str] | None = None
        self._request_body_mode = _BUFFERED
        self._response_body_mode = ProcessingMode.NONE
        #: Response body bytes seen (None: the body does not pass through the picker).
        self._response_bytes: int | None = None
        self._response_headers_seen = False
        self._hold_headers = False
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._held_chunks = 0
        self._routed = False
        self._decision: Decision | None = None
        self._started = 0.0
        self._status = 0
        #: Envoy could not reach the pod (its own reply, tagged by the bootstrap).
        self._unreachable = False
        self._usage: UsageReader | None = None
        self._first_token_seen = False
        self._settled = False
        #: The endpoint Envoy reports it used, when it reports one.
        self.served: str | None = None

    @property
    def decision(self) -> Decision | None:
        return self._decision

    @property
    def finished(self) -> bool:
        """Envoy will send nothing more: the response headers are answered and the response
        body is not sent to the picker (body mode NONE). The servicer then ends the gRPC
        stream itself, so a picker that dies later cannot cut the response (with the stream
        still open, Envoy turns its reset into an error for the client)."""
        return self._response_headers_seen and self._response_body_mode == ProcessingMode.NONE

    # ------------------------------------------------------------------ dispatch
    async def handle(self, req: ProcessingRequest) -> list[ProcessingResponse]:
        if req.HasField("protocol_config"):
            pc = req.protocol_config
            self._request_body_mode = pc.request_body_mode
            self._response_body_mode = pc.response_body_mode
            self._hold_headers = self._request_body_mode == _FULL_DUPLEX or (
                self._request_body_mode == _STREAMED
                and pc.send_body_without_waiting_for_header_response
            )
        served = msg.served_endpoint(req) if req.HasField("metadata_context") else None
        if served:
            self.served = served
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(req)
        if kind == "request_body":
            return await self._request_body(req.request_body.body, req.request_body.end_of_stream)
        if kind == "request_trailers":
            if self._routed:
                return [msg.request_trailers_response()]
            return await self._route_body(end_in_trailers=True)
        if kind == "response_headers":
            return self._response_headers(req)
        if kind == "response_body":
            return self._response_body(req.response_body.body, req.response_body.end_of_stream)
        if kind == "response_trailers":
            self._settle()
            return [msg.response_trailers_response()]
        return []

    # ------------------------------------------------------------------ request side
    def _request_headers(self, req: ProcessingRequest) -> list[ProcessingResponse]:
        self._started = self.clock()
        self.headers = msg.header_map(req.request_headers)
        self._path = self.headers.get(":path", "/")
        if req.HasField("metadata_context"):
            self._subset = msg.subset_hint(req)
        try:
            action = self._picker.path_action(self.headers.get(":method", ""), self._path)
            if action == "models":
                self._routed = True
                return [msg.immediate_response(200, self._picker.models_body(), _JSON_HEADERS)]
            if req.request_headers.end_of_stream:
                raise RequestError(400, "the request has no body (JSON expected)", "missing_body")
        except RequestError as e:
            self._routed = True
            return [error_response(e)]
        if self._hold_headers:
            return []
        # Answer now; the body answer will carry the destination. Client routing headers go.
        return [msg.headers_response(msg.routing_mutation(None, None))]

    async def _request_body(self, chunk: bytes, end: bool) -> list[ProcessingResponse]:
        if self._routed:  # body after an early answer (e.g. an error already sent)
            return self._pass_request_chunk(chunk, end)
        if chunk:
            self._body.append(chunk)
            self._body_bytes += len(chunk)
        limit = self._picker.request_settings.max_body_bytes
        if self._body_bytes > limit:
            self._routed = True
            return [
                error_response(
                    RequestError(
                        413,
                        f"body is over {limit} bytes; the limit is {limit}",
                        "body_too_large",
                    )
                )
            ]
        if not end:
            if self._request_body_mode != _FULL_DUPLEX:
                self._held_chunks += 1
            return []
        if self._request_body_mode != _FULL_DUPLEX:
            self._held_chunks += 1
        return await self._route_body(end_in_trailers=False)

    def _pass_request_chunk(self, chunk: bytes, end: bool) -> list[ProcessingResponse]:
        if self._request_body_mode == _FULL_DUPLEX:
            return [msg.request_body_response(streamed=(chunk, end))]
        return [msg.request_body_response()]

    async def _route_body(self, end_in_trailers: bool) -> list[ProcessingResponse]:
        self._routed = True
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        picker = self._picker
        try:
            decision = await picker.route(body, self._path, self.headers, self._subset)
        except RequestError as e:
            return [error_response(e)]
        self._decision = decision
        if decision.request.tokenize_s is not None:
            picker.metrics.tokenize_duration.observe(decision.request.tokenize_s)
        dest = picker.destination(decision)
        clean = picker.clean_body(decision)
        extra = None if clean is None else {"content-length": str(len(clean))}
        tracing = getattr(picker, "tracing", None)  # `envoy_extproc.observe.PickerTracing`
        if tracing is not None:
            extra = tracing.headers(decision, extra)  # the pod's `traceparent`
        mutation = msg.routing_mutation(dest, decision.prefill, extra)
        metadata = msg.destination_metadata(dest)
        out: list[ProcessingResponse]
        if self._request_body_mode == _FULL_DUPLEX:
            sent = body if clean is None else clean
            out = [
                msg.headers_response(mutation, True, metadata),
                msg.request_body_response(streamed=(sent, not end_in_trailers)),
            ]
        else:
            # One answer per held chunk, in order: the first carries the clean body, the
            # others are cleared; unchanged bodies pass through.
            first = msg.request_body_response(replace=clean)
            rest = msg.request_body_response(replace=None if clean is None else b"")
            if self._hold_headers:
                out = [msg.headers_response(mutation, True, metadata)]
                if self._held_chunks:
                    out += [first] + [rest] * (self._held_chunks - 1)
            else:
                out = [msg.request_body_response(mutation, True, metadata, replace=clean)]
                out += [rest] * (self._held_chunks - 1)
        self._held_chunks = 0
        if end_in_trailers:
            out.append(msg.request_trailers_response())
        return out

    # ------------------------------------------------------------------ response side
    def _response_headers(self, req: ProcessingRequest) -> list[ProcessingResponse]:
        self._response_headers_seen = True
        h = msg.header_map(req.response_headers)
        try:
            self._status = int(h.get(":status", "0"))
        except ValueError:
            self._status = 0
        tagged = UPSTREAM_FAILURE_HEADER in h
        self._unreachable = tagged and self._status >= 500
        if self._picker.settings.parse_responses and self._decision is not None:
            self._usage = UsageReader(
                h.get("content-type", ""), self._picker.settings.max_response_json_bytes
            )
        if req.response_headers.end_of_stream:
            self._settle()
        return [msg.response_headers_response((UPSTREAM_FAILURE_HEADER,) if tagged else ())]

    def _response_body(self, chunk: bytes, end: bool) -> list[ProcessingResponse]:
        decision = self._decision
        if decision is not None and not self._settled:
            if chunk and not self._first_token_seen and self._status < 400:
                self._first_token_seen = True
                self._picker.first_token(decision, self.clock() - self._started)
            if self._usage is not None:
                self._usage.feed(chunk, end)
            self._response_bytes = (self._response_bytes or 0) + len(chunk)
            if end:
                self._settle()
        if self._response_body_mode == _FULL_DUPLEX:
            return [msg.response_body_response(streamed=(chunk, end))]
        return [msg.response_body_response()]

    # ------------------------------------------------------------------ outcome
    def _settle(self) -> None:
        """The response is over: report completion (or failure for a 5xx) once."""
        decision = self._decision
        if decision is None or self._settled:
            return
        self._settled = True
        endpoint = self.served or decision.target
        if 0 < self._status < 500:
            usage = self._usage.usage if self._usage is not None else None
            self._picker.complete(
                decision, usage, self.clock() - self._started, self._response_bytes, endpoint
            )
        else:
            self._picker.fail(
                decision,
                endpoint,
                f"upstream_{self._status or 'no_response'}",
                self._status,
                self._unreachable,
            )

    def close(self) -> None:
        """The stream ended (normally, or cut by Envoy/the client): settle what is open.

        With response headers seen and no body end (response body mode NONE, or a stream
        closed early), the status decides; with none seen the request failed."""
        if self._decision is not None and not self._settled:
            self._settle()
