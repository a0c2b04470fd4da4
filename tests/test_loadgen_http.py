"""The load generator's HTTP/1.1 client (`router/loadgen_http.py`) against real loopback
servers (raw asyncio servers, so each test controls the bytes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.loadgen_http import ConnectionPool, HttpError, Origin, request_bytes

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback TCP server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _on(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


def answer_once(response: bytes) -> Handler:
    """A handler that reads one request, writes `response` and ends the connection."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(response)
        await w.drain()

    return handler


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(timeout_s=5.0)
    yield p
    await p.close()


async def test_a_streamed_response_arrives_chunk_by_chunk_and_its_connection_is_reused(pool):
    first_chunk_seen = asyncio.Event()

    async def handler(r, w):
        while True:
            await read_request(r)
            w.write(CHUNKED_HEAD + b"5\r\nhello\r\n")
            await w.drain()
            await first_chunk_seen.wait()  # the client sees chunk 1 before chunk 2 exists
            w.write(b"6\r\n world\r\n0\r\n\r\n")
            await w.drain()
            first_chunk_seen.clear()

    async with RawServer(handler) as srv:
        origin = Origin.of(srv.url)
        for _ in range(3):
            got = []
            data = request_bytes("POST", origin, "/v1/x", b'{"a":1}', {"X-Test": "1"})
            async with pool.send(origin, data) as resp:
                assert resp.status == 200
                assert resp.headers["content-type"] == "text/event-stream"
                async for c in resp.iter_chunks():
                    got.append(c)
                    first_chunk_seen.set()
            assert got == [b"hello", b" world"]
        assert srv.connections == 1
        assert pool.opened == 1


async def test_the_request_is_written_as_built(pool):
    seen: list[tuple[bytes, bytes]] = []

    async def handler(r, w):
        seen.append(await read_request(r))
        w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await w.drain()
        await r.read()

    async with RawServer(handler) as srv:
        origin = Origin.of(srv.url)
        data = request_bytes(
            "POST", origin, "/v1/chat", b"{}", {"Content-Type": "application/json"}
        )
        async with pool.send(origin, data) as resp:
            assert resp.status == 204 and await resp.read() == b""
    head, body = seen[0]
    assert head.startswith(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Type: application/json\r\n" in head and b"Content-Length: 2\r\n" in head
    assert body == b"{}"


async def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error(pool):
    # each connection closed after one answer, as by a server whose keep-alive timeout ran out
    async with RawServer(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as srv:
        origin = Origin.of(srv.url)
        for _ in range(3):
            async with pool.send(origin, request_bytes("GET", origin, "/")) as resp:
                assert await resp.read() == b"ok"
            await asyncio.sleep(0)  # the server's FIN may or may not have been seen yet
        assert srv.connections == 3


async def test_connection_close_and_read_to_end_bodies_are_not_reused(pool):
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    async with RawServer(answer_once(answer)) as srv:
        origin = Origin.of(srv.url)
        for _ in range(2):
            async with pool.send(origin, request_bytes("GET", origin, "/")) as resp:
                assert await resp.read() == b"until the end"
        assert pool.idle_count(srv.url) == 0
        assert srv.connections == 2


async def test_a_server_dying_mid_stream_is_an_error_and_the_pool_goes_on(pool):
    calls = 0

    async def handler(r, w):
        nonlocal calls
        calls += 1
        await read_request(r)
        if calls == 1:
            w.write(CHUNKED_HEAD + b"5\r\nhel")  # and the connection ends
        else:
            w.write(CHUNKED_HEAD + chunked([b"fine"]))
        await w.drain()

    async with RawServer(handler) as srv:
        origin = Origin.of(srv.url)
        with pytest.raises(HttpError, match="closed the connection before the response ended"):
            async with pool.send(origin, request_bytes("GET", origin, "/")) as resp:
                await resp.read()
        async with pool.send(origin, request_bytes("GET", origin, "/")) as resp:
            assert await resp.read() == b"fine"


async def test_a_refused_connection_is_an_os_error(pool):
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    origin = Origin(host="127.0.0.1", port=port)
    with pytest.raises(OSError):
        async with pool.send(origin, request_bytes("GET", origin, "/")):
            pass


async def test_a_silent_server_times_out_between_reads_not_over_the_whole_response():
    async def handler(r, w):
        await read_request(r)
        w.write(CHUNKED_HEAD)
        for _ in range(4):  # 0.4 s in all, never 0.25 s without a byte
            await asyncio.sleep(0.1)
            w.write(b"1\r\nx\r\n")
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        await read_request(r)
        w.write(CHUNKED_HEAD)  # and nothing more
        await w.drain()
        await asyncio.sleep(5)

    p = ConnectionPool(timeout_s=0.25)
    try:
        async with RawServer(handler) as srv:
            origin = Origin.of(srv.url)
            async with p.send(origin, request_bytes("GET", origin, "/")) as resp:
                assert await resp.read() == b"xxxx"
            with pytest.raises(TimeoutError):
                async with p.send(origin, request_bytes("GET", origin, "/")) as resp:
                    await resp.read()
    finally:
        await p.close()


async def test_a_malformed_status_line_is_an_http_error(pool):
    async with RawServer(answer_once(b"SSH-2.0-OpenSSH\r\n\r\n")) as srv:
        origin = Origin.of(srv.url)
        with pytest.raises(HttpError, match=r"not an HTTP/1\.1 status line"):
            async with pool.send(origin, request_bytes("GET", origin, "/")):
                pass


async def test_warm_keeps_spare_connections_open_after_a_burst_used_them(pool):
    async def handler(r, w):
        while True:
            await read_request(r)
            await asyncio.sleep(0.02)  # all four requests of the burst out at once
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    async with RawServer(handler) as srv:
        url = srv.url
        await pool.warm(url, 4, keep=True)
        assert pool.idle_count(url) == 4 and pool.opened == 4
        origin = Origin.of(url)

        async def one() -> bytes:
            async with pool.send(origin, request_bytes("POST", origin, "/v1/x", b"{}")) as r:
                return await r.read()

        assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
        assert pool.opened == 4  # the burst found its connections open
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pool.idle_count(url) >= 4:
                break
        assert pool.idle_count(url) >= 4


def test_only_plain_http_urls_are_accepted():
    assert Origin.of("http://127.0.0.1:8000/v1") == Origin("127.0.0.1", 8000)
    with pytest.raises(ValueError, match="only http://"):
        Origin.of("https://example.com")


@settings(max_examples=40, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=0, max_size=300), max_size=12),
    segment=st.integers(min_value=1, max_value=64),
)
def test_any_chunking_and_any_tcp_segmentation_give_back_the_body(pieces, segment):
    """The chunked decoder against every split of the wire bytes into writes."""
    wire = CHUNKED_HEAD + chunked(pieces)

    async def main() -> bytes:
        async def handler(r, w):
            await read_request(r)
            for i in range(0, len(wire), segment):
                w.write(wire[i : i + segment])
                await w.drain()
                await asyncio.sleep(0)
            await r.read()

        p = ConnectionPool(timeout_s=5.0)
        try:
            async with RawServer(handler) as srv:
                origin = Origin.of(srv.url)
                async with p.send(origin, request_bytes("GET", origin, "/")) as resp:
                    return await resp.read()
        finally:
            await p.close()

    assert asyncio.run(main()) == b"".join(pieces)
