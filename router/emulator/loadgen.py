"""A light streaming client for measuring an OpenAI-compatible server's timing from outside.

`stream_completion` sends one streaming request over a raw HTTP/1.1 connection (asyncio
streams, no client library, so the client's own overhead stays small next to the server's) and
records when each SSE event arrived. It asks for `stream_options.continuous_usage_stats`, so
every chunk says how many tokens have been generated so far and coalesced chunks still give
exact token counts. Used by the emulator's timing tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class StreamTiming:
    status: int
    sent_at: float
    #: (arrival time, completion tokens so far) per chunk that carried tokens.
    chunks: list[tuple[float, int]] = field(default_factory=list)
    done: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.sent_at

    @property
    def tokens(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0

    @property
    def mean_itl(self) -> float:
        """(last token time - first token time) / (tokens after the first)."""
        (t0, n0), (t1, n1) = self.chunks[0], self.chunks[-1]
        return (t1 - t0) / (n1 - n0) if n1 > n0 else 0.0


async def stream_completion(
    host: str,
    port: int,
    body: dict[str, Any],
    path: str = "/v1/completions",
    timeout_s: float = 60.0,
    request_id: str | None = None,
) -> StreamTiming:
    payload = dict(body)
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    data = json.dumps(payload).encode()
    rid = f"x-request-id: {request_id}\r\n" if request_id else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{rid}"
        f"Accept: text/event-stream\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(timeout_s):
            sent = time.perf_counter()
            writer.write(head + data)
            await writer.drain()
            return await _read_stream(reader, sent)
    finally:
        writer.close()


async def _read_stream(reader: asyncio.StreamReader, sent: float) -> StreamTiming:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    chunked = False
    length = None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name.lower() == "content-length":
            length = int(value)
    out = StreamTiming(status, sent)
    if status != 200:
        raw = await (reader.readexactly(length) if length is not None else reader.read())
        out.error = raw.decode(errors="replace")
        return out
    buf = b""
    while True:
        if chunked:
            size_line = await reader.readline()
            if not size_line:
                break
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                break
            piece = await reader.readexactly(size + 2)
            piece = piece[:-2]
        else:
            piece = await reader.read(65536)
            if not piece:
                break
        now = time.perf_counter()
        buf += piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: "):
                continue
            text = event[6:]
            if text == b"[DONE]":
                out.done = True
                continue
            chunk = json.loads(text)
            usage = chunk.get("usage")
            if chunk.get("choices") and usage:
                out.chunks.append((now, usage["completion_tokens"]))
    return out
