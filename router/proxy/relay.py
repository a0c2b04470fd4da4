"""ASGI side of a forwarded exchange: read the client's body, relay the pod's answer, notice
the client leaving. Shared by the proxy and the decode sidecar.

Streams are relayed chunk by chunk as the pod sends them (no re-framing, no buffering). A pod
that fails after the client got its first byte is reported in-band: streams end with an SSE
error event, non-streams become a 502/504 (nothing was sent yet for them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from router.proxy.errors import UpstreamFailure, error_body, error_headers, sse_error_event
from router.proxy.upstream import Opened
from router.request import RequestError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class _UsageOnly(msgspec.Struct):
    usage: dict[str, Any] | None = None


_decode_usage = msgspec.json.Decoder(_UsageOnly).decode


class ClientLeft(Exception):
    """The client hung up before its request body was complete (routine, not a crash)."""


async def read_body(receive: Receive, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole request body; `RequestError(413)` past `limit` bytes, `RequestError(408)`
    when it is not all there within `timeout_s` (a slow or stalled sender holds a
    connection and a task), `ClientLeft` when the client hangs up mid-body."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise RequestError(
            408, f"the request body did not arrive within {timeout_s:g}s", "body_read_timeout"
        ) from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    msg = await receive()
    if msg["type"] == "http.disconnect":
        raise ClientLeft("client left before sending its body")
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        if len(body) > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes", "body_too_large")
        return body
    parts = [body]
    size = len(body)
    while msg.get("more_body"):
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientLeft("client left while sending its body")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes", "body_too_large")
        parts.append(chunk)
    return b"".join(parts)


async def send_error(
    send: Send, err: RequestError, retry_after_s: int = 1, extra: Headers = ()
) -> None:
    await send_full(send, err.status, [*error_headers(err, retry_after_s), *extra], error_body(err))


async def send_full(send: Send, status: int, headers: Headers, body: bytes) -> None:
    """A whole answer with its Content-Length: never re-framed as chunked (HTTP/1.0 clients
    cannot take chunked, RFC 9112 section 7.1), and the client knows where it ends."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ClientWatch:
    """Cancels the handling task when the client disconnects before the answer is complete.

    The handler calls `finish()` before its last send, catches `CancelledError` and asks
    `left` whether the cancel was ours (then it cleans up and returns normally).
    """

    __slots__ = ("_finished", "_task", "_watcher", "left")

    def __init__(self, receive: Receive) -> None:
        self.left = False
        self._finished = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
        if not self._finished and self._task is not None:
            self.left = True
            self._task.cancel()

    def finish(self) -> None:
        self._finished = True

    def close(self) -> None:
        self._finished = True
        if not self._watcher.done():
            self._watcher.cancel()

    def absorb_cancel(self) -> bool:
        """In an `except CancelledError`: True (and the cancel undone) when the client left."""
        if self.left and self._task is not None:
            self._task.uncancel()
            return True
        return False


@dataclass(slots=True)
class Delivered:
    status: int
    usage: dict[str, Any] | None
    #: The body of a non-streaming answer (for callers that need more than usage).
    body: bytes = b""


def usage_of_body(body: bytes) -> dict[str, Any] | None:
    try:
        return _decode_usage(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def usage_of_sse_tail(tail: bytes) -> dict[str, Any] | None:
    """Usage from the last `data:` event that carries one (vLLM's `include_usage` chunk)."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.rfind(b"data:", 0, at)
    end = tail.find(b"\n", at)
    if start < 0:
        return None
    line = tail[start + 5 : end if end >= 0 else len(tail)].strip()
    usage = usage_of_body(line)
    return usage


async def deliver_full(
    opened: Opened, send: Send, deadline: float, extra: Headers, watch: ClientWatch | None
) -> Delivered:
    """Read the pod's whole answer, then send it. Raises `UpstreamFailure` (nothing sent)."""
    resp = opened.response
    try:
        async with asyncio.timeout_at(deadline):
            body = await resp.read()
    except TimeoutError:
        resp.close()
        raise UpstreamFailure(
            opened.endpoint, "timeout_total", "answer not complete", False
        ) from None
    except (aiohttp.ClientError, OSError) as e:
        resp.close()
        raise UpstreamFailure(opened.endpoint, "broken_stream", repr(e), False) from None
    except BaseException:
        resp.close()
        raise
    if watch is not None:
        watch.finish()
    # The pod's Content-Length is the body's length: send_full keeps it.
    await send_full(send, resp.status, [*opened.response_headers(), *extra], body)
    return Delivered(resp.status, usage_of_body(body) if resp.status == 200 else None, body)


class BrokenStream(UpstreamFailure):
    """The pod failed after the client's stream began; the client already got an error event."""


async def deliver_stream(
    opened: Opened,
    send: Send,
    deadline: float,
    extra: Headers,
    watch: ClientWatch | None,
    on_first_byte: Callable[[], None] | None = None,
    idle_timeout_s: float | None = None,
) -> Delivered:
    """Relay an SSE answer chunk by chunk. Raises `BrokenStream` when the pod fails mid-way:
    it closed the connection, sent nothing for `idle_timeout_s`, or missed `deadline` (after
    ending the client's stream with an error event)."""
    resp = opened.response
    if resp.status != 200:  # an error answer to a streaming request is plain JSON
        return await deliver_full(opened, send, deadline, extra, watch)
    headers = [*_SSE_HEADERS, *extra]
    rid = resp.headers.get("x-request-id")
    if rid is not None:
        headers.append((b"x-request-id", rid.encode("latin-1")))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    chunk = opened.first_chunk
    prev = b""
    failure: UpstreamFailure | None = None
    read = resp.content.readany
    try:
        if chunk:
            if on_first_byte is not None:
                on_first_byte()
                on_first_byte = None
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        loop = asyncio.get_running_loop()
        while True:
            until = deadline
            if idle_timeout_s is not None:
                until = min(deadline, loop.time() + idle_timeout_s)
            try:
                async with asyncio.timeout_at(until):
                    nxt = await read()
            except TimeoutError:
                if until < deadline:
                    detail = f"nothing for {idle_timeout_s:g}s"
                    failure = BrokenStream(opened.endpoint, "timeout_idle", detail, False)
                else:
                    failure = BrokenStream(
                        opened.endpoint, "timeout_total", "stream not done", False
                    )
                break
            except (aiohttp.ClientError, OSError) as e:
                failure = BrokenStream(opened.endpoint, "broken_stream", repr(e), False)
                break
            if not nxt:
                break
            if on_first_byte is not None:
                on_first_byte()
                on_first_byte = None
            prev, chunk = chunk, nxt
            await send({"type": "http.response.body", "body": nxt, "more_body": True})
    except BaseException:
        resp.close()
        raise
    if watch is not None:
        watch.finish()
    if failure is not None:
        resp.close()
        await send(
            {"type": "http.response.body", "body": sse_error_event(failure.to_request_error())}
        )
        raise failure
    resp.release()
    await send({"type": "http.response.body", "body": b""})
    return Delivered(200, usage_of_sse_tail(prev[-4096:] + chunk[-8192:]))
