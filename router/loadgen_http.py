"""The load generator's HTTP/1.1 client: pre-built requests written on pooled keep-alive
connections (asyncio streams), responses read as they arrive.

Why not aiohttp (which the proxy uses upstream): a load generator's cost shows as send lag.
On a Mooncake burst (up to 16 requests due at the same instant) aiohttp's synchronous part of
each `post` — building the request, its headers and writer, taking a connection — cost
0.05–0.7 ms, so a burst's last request left 2.5–3.5 ms late and every Mooncake run was
flagged invalid. Here a request is one `bytes` object (head and body) built before it is due;
sending it is taking an idle connection from the pool and one `write`.

Connections: per origin (`host:port`), idle ones reused last-in first-out; a request that finds
none opens one. `warm(url, n, keep=True)` keeps about `n` idle connections ready, reopening
them a little after a burst used them (`REFILL_DELAY_S`), so a connect never lands in a
burst. A reused connection the server had closed (its EOF not yet seen) fails before any byte
of the response arrives: the request is sent once more on a new connection (the server never
read it).

Timeouts as a client's read timeout: `timeout_s` for the connect and between any two reads of
the response, not for the whole response.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Delay before idle connections used by a burst are reopened (seconds).
REFILL_DELAY_S = 0.05
#: Longest response head accepted (bytes).
MAX_HEAD_BYTES = 64 << 10
_CLOSED_MID_BODY = "the server closed the connection before the response ended"


class HttpError(Exception):
    """The server's answer is not HTTP/1.1 this client can read, or the connection ended
    before the response did."""


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"only http:// URLs are supported, not {url!r}")
        return cls(u.hostname, u.port or 80)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


def request_bytes(
    method: str,
    origin: Origin,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """One HTTP/1.1 request, head and body, ready to write."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.authority}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    _conn: _Conn
    _pool: ConnectionPool
    _origin: Origin
    _timeout: asyncio.Timeout
    _timeout_s: float
    _done: bool = False
    _reusable: bool = False

    def _tick(self) -> None:
        self._timeout.reschedule(asyncio.get_running_loop().time() + self._timeout_s)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked, sized, or to the connection's end)."""
        r = self._conn.reader
        length = self.headers.get("content-length")
        keep = self.headers.get("connection", "").lower() != "close"
        if self.status in (204, 304) or self.status < 200:
            pass
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                line = await r.readline()
                self._tick()
                if not line:
                    raise HttpError(_CLOSED_MID_BODY)
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise HttpError(f"bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    while (await r.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                try:
                    data = await r.readexactly(size + 2)
                except asyncio.IncompleteReadError:
                    raise HttpError(_CLOSED_MID_BODY) from None
                self._tick()
                yield data[:-2]
        elif length is not None:
            left = int(length)
            while left > 0:
                data = await r.read(min(left, 1 << 20))
                self._tick()
                if not data:
                    raise HttpError(_CLOSED_MID_BODY)
                left -= len(data)
                yield data
        else:
            keep = False
            while data := await r.read(1 << 20):
                self._tick()
                yield data
        self._done = True
        self._reusable = keep

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_chunks()])

    def release(self) -> None:
        """Give the connection back (kept alive only if the body was read to its end)."""
        if self._done and self._reusable:
            self._pool._put(self._origin, self._conn)
        else:
            self._conn.close()


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections per origin (see the module docstring)."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self._idle: dict[Origin, list[_Conn]] = {}
        self._spare: dict[Origin, int] = {}
        self._refill: set[Origin] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        #: Connections opened (warm-ups, refills and on demand).
        self.opened = 0

    async def _open(self, origin: Origin) -> _Conn:
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await asyncio.open_connection(
                origin.host, origin.port, limit=MAX_HEAD_BYTES
            )
        self.opened += 1
        return _Conn(reader, writer)

    def _put(self, origin: Origin, conn: _Conn) -> None:
        if self._closed or not conn.usable():
            conn.close()
            return
        self._idle.setdefault(origin, []).append(conn)

    def _take(self, origin: Origin) -> _Conn | None:
        idle = self._idle.get(origin, [])
        conn = None
        while idle and conn is None:
            conn = idle.pop()
            if not conn.usable():
                conn.close()
                conn = None
        if len(idle) < self._spare.get(origin, 0):
            self._schedule_refill(origin)
        return conn

    def _schedule_refill(self, origin: Origin) -> None:
        if origin in self._refill or self._closed:
            return
        self._refill.add(origin)
        task = asyncio.get_running_loop().create_task(self._top_up(origin))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _top_up(self, origin: Origin) -> None:
        try:
            await asyncio.sleep(REFILL_DELAY_S)
            with contextlib.suppress(OSError, TimeoutError):
                await self._fill(origin, self._spare.get(origin, 0))
        finally:
            self._refill.discard(origin)

    async def _fill(self, origin: Origin, n: int) -> None:
        """Open connections to `origin` until `n` are idle."""
        want = n - len(self._idle.get(origin, []))
        if want > 0:
            for c in await asyncio.gather(*(self._open(origin) for _ in range(want))):
                self._put(origin, c)

    async def warm(self, url: str, n: int, keep: bool = False) -> None:
        """Open connections to `url`'s origin until `n` are idle; with `keep`, keep about
        that many idle from now on (reopened after use). Raises OSError when the server is
        not up."""
        origin = Origin.of(url)
        if keep:
            self._spare[origin] = n
        await self._fill(origin, n)

    def idle_count(self, url: str) -> int:
        return len(self._idle.get(Origin.of(url), []))

    @contextlib.asynccontextmanager
    async def send(self, origin: Origin, data: bytes) -> AsyncIterator[Response]:
        """Write `data` (a whole request, see `request_bytes`) and yield the response once
        its head has arrived; the connection goes back to the pool after the block when the
        body was read to its end."""
        async with asyncio.timeout(self.timeout_s) as timeout:
            conn = self._take(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._open(origin)
            try:
                head = await self._exchange(conn, data)
            except (ConnectionError, HttpError, asyncio.IncompleteReadError):
                conn.close()
                if not reused:
                    raise
                conn = await self._open(origin)  # the server closed it while it was idle
                head = await self._exchange(conn, data)
            except BaseException:
                conn.close()
                raise
            timeout.reschedule(asyncio.get_running_loop().time() + self.timeout_s)
            response = _parse_head(head, conn, self, origin, timeout, self.timeout_s)
            try:
                yield response
            finally:
                response.release()

    @staticmethod
    async def _exchange(conn: _Conn, data: bytes) -> bytes:
        conn.writer.write(data)
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError("response head too long") from None
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise ConnectionResetError("the server closed the connection") from None
            raise HttpError("connection closed inside the response head") from None
        return head

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()


def _parse_head(
    head: bytes,
    conn: _Conn,
    pool: ConnectionPool,
    origin: Origin,
    timeout: asyncio.Timeout,
    timeout_s: float,
) -> Response:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        conn.close()
        raise HttpError(f"not an HTTP/1.1 status line: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    reason = parts[2] if len(parts) > 2 else ""
    return Response(int(parts[1]), reason, headers, conn, pool, origin, timeout, timeout_s)
