"""The gRPC face: `envoy.service.ext_proc.v3.ExternalProcessor/Process` on grpcio asyncio.

Owns moving messages between the gRPC stream and an `ExtProcStream`, counting open streams,
and making sure a stream always ends with its outcome settled, whether Envoy closes it, the
client goes away or the server shuts down. A stream Envoy will send nothing more on
(`ExtProcStream.finished`) is ended by the picker right away. A bug in the picker becomes a
500 ImmediateResponse for that request, never a broken gRPC stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from envoy_extproc.picker import Picker
from envoy_extproc.stream import ExtProcStream, error_response
from router.request import RequestError

log = logging.getLogger(__name__)
_PICKER_FAILED = RequestError(500, "the endpoint picker failed", "picker_error")


class ExternalProcessorServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, picker: Picker) -> None:
        self.picker = picker
        self.active = 0

    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        stream = ExtProcStream(self.picker)
        gauge = self.picker.metrics.streams
        self.active += 1
        gauge.inc()
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                try:
                    responses = await stream.handle(message)
                except Exception:
                    log.exception("ext_proc: picker failed on a %s", message.WhichOneof("request"))
                    await context.write(error_response(_PICKER_FAILED))
                    return
                for response in responses:
                    await context.write(response)
                if stream.finished:
                    return
        finally:
            self.active -= 1
            gauge.dec()
            try:
                stream.close()
            except Exception:
                log.exception("ext_proc: settling a closed stream failed")


def add_to_server(servicer: ExternalProcessorServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
