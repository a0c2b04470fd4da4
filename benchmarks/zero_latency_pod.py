"""A zero-latency vLLM-shaped HTTP server for overhead benchmarks.

Answers `POST /v1/completions` and `/v1/chat/completions` at once with a fixed small body (or
a four-chunk SSE stream when the body asks for `"stream": true`), and `GET /health`,
`/metrics`, `/v1/models`. A raw asyncio protocol on uvloop with HTTP/1.1 keep-alive, so the
pod costs next to nothing and a benchmark measures what sits in front of it.

    python benchmarks/zero_latency_pod.py --ports 8001 8002   # prints "ready" when listening
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

_COMPLETION = (
    b'{"id":"cmpl-0","object":"text_completion","created":0,"model":"m","choices":[{"index":0,'
    b'"text":"ok","finish_reason":"length"}],"usage":{"prompt_tokens":4,"completion_tokens":1,'
    b'"total_tokens":5}}'
)
_CHUNK = (
    b'data: {"id":"cmpl-0","object":"text_completion","model":"m",'
    b'"choices":[{"index":0,"text":"ok"}]}\n\n'
)
_STREAM_BODY = _CHUNK * 4 + b"data: [DONE]\n\n"
_METRICS = (
    b'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 0\n'
    b'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 0\n'
    b'# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0\n'
)
_MODELS = b'{"object":"list","data":[{"id":"m","object":"model"}]}'


def _response(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + ctype
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_ANSWERS = {
    b"/v1/completions": _response(b"200 OK", b"application/json", _COMPLETION),
    b"/v1/chat/completions": _response(b"200 OK", b"application/json", _COMPLETION),
    b"/health": _response(b"200 OK", b"text/plain", b""),
    b"/metrics": _response(b"200 OK", b"text/plain", _METRICS),
    b"/v1/models": _response(b"200 OK", b"application/json", _MODELS),
}
_STREAM = _response(b"200 OK", b"text/event-stream", _STREAM_BODY)
_NOT_FOUND = _response(b"404 Not Found", b"application/json", b'{"error":"not found"}')


class _Http(asyncio.Protocol):
    __slots__ = ("buf", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            at = head.lower().find(b"content-length:")
            if at >= 0:
                eol = head.find(b"\r\n", at)
                length = int(head[at + 15 : eol if eol > 0 else None])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            path = head.split(b" ", 2)[1].split(b"?", 1)[0]
            if b'"stream":true' in body.replace(b" ", b""):
                self.transport.write(_STREAM)  # type: ignore[attr-defined]
            else:
                self.transport.write(_ANSWERS.get(path, _NOT_FOUND))  # type: ignore[attr-defined]


async def serve(ports: list[int], host: str = "127.0.0.1") -> list[asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    return [await loop.create_server(_Http, host, port, backlog=1024) for port in ports]


async def _main(ports: list[int]) -> None:
    servers = await serve(ports)
    print("ready", " ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    try:
        uvloop.run(_main(args.ports))
    except KeyboardInterrupt:
        sys.exit(0)
