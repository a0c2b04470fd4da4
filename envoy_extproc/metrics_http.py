"""The Prometheus endpoint: `GET /metrics` in the text exposition format, on the event loop,
and the face's JSON debug pages beside it (`/debug/reuse`).

A small asyncio HTTP/1.1 responder (one request per connection) instead of prometheus_client's
threaded server, so the page is rendered on the same loop as the state it reads (no locking
against the scheduler) and the server stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_MAX_HEAD = 16 * 1024
log = logging.getLogger(__name__)


class MetricsHTTPServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        debug: Mapping[str, Callable[[], Any]] | None = None,
    ) -> None:
        """`debug`: path → a function returning the page as plain JSON data."""
        self.registry = registry
        self._debug = {k.encode(): v for k, v in (debug or {}).items()}
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        parts = head[:_MAX_HEAD].split(b"\r\n", 1)[0].split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, ctype, body = b"405 Method Not Allowed", b"text/plain", b"GET only\n"
        elif path in (b"/metrics", b"/"):
            status, ctype, body = (
                b"200 OK",
                CONTENT_TYPE_LATEST.encode(),
                generate_latest(self.registry),
            )
        elif path in self._debug:
            page = msgspec.json.encode(self._debug[path]())
            status, ctype, body = b"200 OK", b"application/json", page
        else:
            status, ctype, body = b"404 Not Found", b"text/plain", b"try /metrics\n"
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, ctype, len(body))
        )
        if method != b"HEAD":
            writer.write(body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
