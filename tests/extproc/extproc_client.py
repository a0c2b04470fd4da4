"""Driving the ext_proc servicer the way Envoy does, over a real gRPC channel on 127.0.0.1.

`ExtProcHarness` serves `ExternalProcessorServicer` (with a scheduler over a static fleet
whose pods nobody needs to reach: no request leaves the picker here) and opens Process
streams; the `*_msg` helpers build the `ProcessingRequest`s Envoy sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from google.protobuf.struct_pb2 import Struct

from envoy_extproc.metrics import PickerMetrics
from envoy_extproc.picker import Picker
from envoy_extproc.servicer import ExternalProcessorServicer, add_to_server
from envoy_extproc.settings import ExtProcSettings
from router.config import parse_config
from router.scheduler import Decision, Scheduler

MODEL = "m"
PODS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
FLEET = "pods:\n" + "".join(f"  - {{endpoint: '{p}', models: [{MODEL}]}}\n" for p in PODS)


def headers_msg(
    headers: dict[str, str],
    end: bool = False,
    mode: int | None = None,
    early_body: bool = False,
    response_mode: int = ProcessingMode.NONE,
    metadata: dict[str, dict[str, Any]] | None = None,
) -> ProcessingRequest:
    hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])
    req = ProcessingRequest(request_headers=HttpHeaders(headers=hm, end_of_stream=end))
    if mode is not None:
        req.protocol_config.CopyFrom(
            ProtocolConfiguration(
                request_body_mode=mode,
                response_body_mode=response_mode,
                send_body_without_waiting_for_header_response=early_body,
            )
        )
    if metadata:
        md = Metadata()
        for ns, values in metadata.items():
            s = Struct()
            s.update(values)
            md.filter_metadata[ns].CopyFrom(s)
        req.metadata_context.CopyFrom(md)
    return req


def post_headers(path: str = "/v1/chat/completions", **extra: str) -> dict[str, str]:
    return {":method": "POST", ":path": path, "content-type": "application/json", **extra}


def body_msg(chunk: bytes, end: bool) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=chunk, end_of_stream=end))


def trailers_msg() -> ProcessingRequest:
    return ProcessingRequest(request_trailers=HttpTrailers())


def response_headers_msg(
    status: int, content_type: str, end: bool = False, served: str | None = None
) -> ProcessingRequest:
    hm = HeaderMap(
        headers=[
            HeaderValue(key=":status", raw_value=str(status).encode()),
            HeaderValue(key="content-type", raw_value=content_type.encode()),
        ]
    )
    req = ProcessingRequest(response_headers=HttpHeaders(headers=hm, end_of_stream=end))
    if served is not None:
        s = Struct()
        s.update({"x-gateway-destination-endpoint-served": served})
        req.metadata_context.filter_metadata["envoy.lb"].CopyFrom(s)
    return req


def response_body_msg(chunk: bytes, end: bool) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=chunk, end_of_stream=end))


def set_headers(resp: Any) -> dict[str, str]:
    """The header mutation of a headers/body response's CommonResponse, as a dict."""
    common = getattr(resp, resp.WhichOneof("response")).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def removed_headers(resp: ProcessingResponse) -> list[str]:
    common = getattr(resp, resp.WhichOneof("response")).response
    return list(common.header_mutation.remove_headers)


def lb_metadata(resp: ProcessingResponse) -> dict[str, Any]:
    return dict(resp.dynamic_metadata.fields["envoy.lb"].struct_value)


@dataclass
class ExtProcHarness:
    config_text: str = FLEET
    settings: ExtProcSettings = field(default_factory=ExtProcSettings)
    failures: list[tuple[Decision, str]] = field(default_factory=list)
    completions: list[tuple[Decision, dict[str, Any] | None]] = field(default_factory=list)

    async def __aenter__(self) -> ExtProcHarness:
        self.scheduler = Scheduler(parse_config(self.config_text), seed=1)
        sched = self.scheduler
        on_failure, on_complete = sched.on_failure, sched.on_complete

        def failure(decision: Decision, endpoint: str, now: float | None = None) -> None:
            self.failures.append((decision, endpoint))
            on_failure(decision, endpoint, now)

        def complete(
            decision: Decision, usage: dict[str, Any] | None = None, now: float | None = None
        ) -> None:
            self.completions.append((decision, usage))
            on_complete(decision, usage, now)

        sched.on_failure = failure  # type: ignore[method-assign]
        sched.on_complete = complete  # type: ignore[method-assign]
        self.metrics = PickerMetrics()
        self.picker = Picker(sched, self.settings, self.metrics)
        self.servicer = ExternalProcessorServicer(self.picker)
        self.server = grpc.aio.server()
        add_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)

    def open(self) -> grpc.aio.StreamStreamCall:
        return self.stub.Process()

    @property
    def inflight(self) -> int:
        return sum(p.inflight_requests for p in self.scheduler.registry)
