"""The proxy's HTTP edge under misbehaving clients (issue 18): HTTP/1.0 framing, clients that
hang up mid-body or hold a partial body, the connection cap, and vLLM-shaped errors. Raw
sockets on loopback, so the bytes on the wire are what is checked."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.proxy.relay import ClientLeft, read_body
from router.request import RequestError

BODY = json.dumps({"model": "m", "prompt": "hello there", "max_tokens": 4}).encode()


def _request(host: str, version: str = "1.1", body: bytes = BODY, length: int | None = None):
    size = len(body) if length is None else length
    head = (
        f"POST /v1/completions HTTP/{version}\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send `data`, read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.read(-1)
    finally:
        writer.close()


def _split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, body


async def test_http10_client_gets_content_length_never_chunked(pods, proxy):
    async with proxy(pods) as (_app, client):
        port = client.base_url.port
        raw = await _exchange(port, _request(f"127.0.0.1:{port}", "1.0"))
        status, headers, body = _split(raw)
        assert status.startswith("HTTP/1.0 200") or status.startswith("HTTP/1.1 200"), status
        assert "transfer-encoding" not in headers  # RFC 9112: no chunked to HTTP/1.0
        assert int(headers["content-length"]) == len(body)
        assert json.loads(body)["usage"]["completion_tokens"] == 4


async def test_http11_non_streamed_answers_keep_a_content_length(pods, proxy):
    async with proxy(pods) as (_app, client):
        r = await client.post("/v1/completions", content=BODY)
        assert r.status_code == 200
        assert "transfer-encoding" not in r.headers
        assert int(r.headers["content-length"]) == len(r.content)
        err = await client.post("/v1/completions", content=b"{oops")
        assert int(err.headers["content-length"]) == len(err.content)


async def test_client_hanging_up_mid_body_is_a_counted_info_event(pods, proxy, caplog):
    caplog.set_level(logging.INFO)
    await _hang_up_mid_body(pods, proxy, caplog.handler)
    assert "Exception in ASGI application" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    left = [r for r in caplog.records if "client left" in r.getMessage()]
    assert left and all(r.levelno == logging.INFO for r in left)


async def _hang_up_mid_body(pods, proxy, handler: logging.Handler) -> None:
    async with proxy(pods) as (_app, client):
        # uvicorn's loggers do not reach the root logger, and uvicorn resets their handlers
        # when it starts: listen on its error logger now that it runs.
        uvicorn_errors = logging.getLogger("uvicorn.error")
        uvicorn_errors.addHandler(handler)
        try:
            await _send_half_a_body_and_leave(client)
        finally:
            uvicorn_errors.removeHandler(handler)


async def _send_half_a_body_and_leave(client) -> None:
    port = client.base_url.port
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(f"127.0.0.1:{port}", length=len(BODY) + 500))
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    counted = False
    for _ in range(50):
        text = (await client.get("/metrics")).text
        counted = "kvroute_proxy_client_disconnects_total 1.0" in text
        if counted:
            break
        await asyncio.sleep(0.05)
    assert counted
    assert (await client.post("/v1/completions", content=BODY)).status_code == 200


async def test_partial_bodies_get_408_and_closed_after_the_body_read_timeout(pods, proxy):
    n = 300
    async with proxy(pods, body_read_timeout_s=0.5) as (_app, client):
        port = client.base_url.port
        conns = []
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request(f"127.0.0.1:{port}", length=len(BODY) + 100))
            conns.append((reader, writer))
        t0 = time.monotonic()
        try:
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(-1), 10.0) for r, _w in conns))
        finally:
            for _r, w in conns:
                w.close()
        took = time.monotonic() - t0
        statuses = [_split(a)[0].split(" ")[1] for a in answers]
        assert statuses == ["408"] * n  # and each connection closed (read(-1) returned)
        error = json.loads(_split(answers[0])[2])["error"]
        assert error["code"] == 408 and "did not arrive within 0.5s" in error["message"]
        assert took < 8.0
        metrics = (await client.get("/metrics")).text
        assert f'kvroute_proxy_rejected_total{{reason="body_read_timeout"}} {n}.0' in metrics
        assert (await client.post("/v1/completions", content=BODY)).status_code == 200


async def test_requests_over_max_connections_get_503_with_retry_after(pods, proxy):
    cap, extra = 100, 20
    async with proxy(pods, body_read_timeout_s=3.0, max_connections=cap) as (_app, client):
        port = client.base_url.port
        held = []
        for _ in range(cap):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request(f"127.0.0.1:{port}", length=len(BODY) + 100))
            held.append((reader, writer))
        await asyncio.sleep(0.3)  # all of them are open requests now
        try:
            refused = await asyncio.gather(
                *(_exchange(port, _request(f"127.0.0.1:{port}")) for _ in range(extra))
            )
            # The control endpoints stay reachable at the cap.
            assert (await client.get("/health")).status_code == 200
        finally:
            for _r, w in held:
                w.close()
        for raw in refused:
            status, headers, body = _split(raw)
            assert status.split(" ")[1] == "503"
            assert headers["retry-after"] == "1" and headers["connection"] == "close"
            assert json.loads(body)["error"]["type"] == "ServiceUnavailableError"
        metrics = (await client.get("/metrics")).text
        assert f'kvroute_proxy_rejected_total{{reason="max_connections"}} {extra}.0' in metrics


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("GET", "/v1/completions", 405, "MethodNotAllowedError"),
        ("GET", "/v1/chat/completions", 405, "MethodNotAllowedError"),
        ("POST", "/health", 405, "MethodNotAllowedError"),
        ("POST", "/v1/nope", 404, "NotFoundError"),
    ],
)
async def test_the_proxys_own_errors_are_shaped_like_vllms(pods, proxy, method, path, status, kind):
    async with proxy(pods) as (_app, client):
        r = await client.request(method, path)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["code"] == status and error["param"] is None
    assert path.split("?")[0] in error["message"]


async def test_a_bad_field_names_its_param(pods, proxy):
    async with proxy(pods) as (_app, client):
        r = await client.post(
            "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": -1}
        )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens"
    assert r.json()["error"]["type"] == "BadRequestError"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=64), max_size=12),
    st.integers(min_value=0, max_value=400),
    st.booleans(),
)
def test_read_body_joins_any_chunking_and_enforces_its_limit(chunks, limit, leaves):
    """ASGI `http.request` messages as uvicorn sends them: the body is their concatenation,
    413 past the limit, `ClientLeft` when a disconnect comes before the last chunk."""
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks or [b""])
    ]
    if leaves:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})
    feed = iter(messages)

    async def receive():
        return next(feed)

    whole = b"".join(chunks)

    async def run():
        return await read_body(receive, limit, timeout_s=5.0)

    try:
        got = asyncio.run(run())
    except RequestError as err:
        assert err.status == 413 and len(whole) > limit
        return
    except ClientLeft:
        assert leaves
        return
    assert not leaves and got == whole and len(got) <= limit
