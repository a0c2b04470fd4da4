"""Canary: a loopback HTTP server standing in for an internal host no client may reach.

It accepts any TCP connection on 127.0.0.1, records what arrives (the peer and the first bytes),
answers `418` and closes. A test is failed when `hits` is not empty: any byte reaching it means
a client steered traffic inside the fleet (an SSRF). Attack bodies name its address.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

_ANSWER = b"HTTP/1.1 418 canary\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass
class Canary:
    host: str = "127.0.0.1"
    port: int = 0
    #: (peer, first bytes) of every connection.
    hits: list[tuple[Any, bytes]] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> Canary:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            data = await asyncio.wait_for(reader.read(65536), 0.5)
        self.hits.append((writer.get_extra_info("peername"), data))
        with contextlib.suppress(ConnectionError):
            writer.write(_ANSWER)
            await writer.drain()
        writer.close()

    async def assert_untouched(self, settle_s: float = 0.05) -> None:
        """Fail when anything reached the canary (after a moment for late connections)."""
        await asyncio.sleep(settle_s)
        assert not self.hits, f"the canary at {self.endpoint} was reached: {self.hits[:3]!r}"

    def ssrf_params(self) -> dict[str, Any]:
        """`kv_transfer_params` telling a decode engine to pull KV from the canary (what
        vLLM's NixlConnector and kvroute's emulator act on)."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": "attacker-engine",
            "remote_block_ids": [0, 1, 2],
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_request_id": "attack",
            "tp_size": 1,
        }
