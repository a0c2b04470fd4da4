"""Pooled HTTP/1.1 connections to pods and the classification of what can go wrong.

Built on aiohttp's client: `benchmarks/upstream_client.py` measured it several times faster than
httpx's `AsyncClient` as a forwarder's upstream client on this machine (see that script's
docstring for the figures). One `ClientSession` holds a keep-alive pool per pod.

`Upstream.open()` returns once the pod has answered with a status (and, for a stream, sent its
first body chunk), or raises `UpstreamFailure` saying whether the request may be retried on
another pod: connect refused/reset or a 5xx before the first byte may; a timeout may not (the
pod may be working on it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from router.proxy.errors import UpstreamFailure
from router.proxy.settings import ProxySettings

#: Request headers never forwarded: hop-by-hop, recomputed, or routing instructions that only
#: the router may give (a client must not pick its own pod).
DROPPED_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"accept-encoding",
        b"expect",
        b"x-gateway-destination-endpoint",
        b"x-prefiller-host-port",
    }
)
#: Response headers passed back to the client.
PASSED_RESPONSE_HEADERS = ("content-type", "x-request-id")


def forwarded_headers(
    raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = DROPPED_REQUEST_HEADERS
) -> dict[str, str]:
    """The client's headers minus hop-by-hop and routing headers, as aiohttp wants them."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw if k not in drop}


@dataclass(slots=True)
class Opened:
    endpoint: str
    response: aiohttp.ClientResponse
    #: Streams: the first body chunk (b"" when the body is empty). Non-streams: b"".
    first_chunk: bytes = b""

    @property
    def status(self) -> int:
        return self.response.status

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        h = self.response.headers
        return [
            (name.encode(), h[name].encode("latin-1"))
            for name in PASSED_RESPONSE_HEADERS
            if name in h
        ]


class Upstream:
    """The proxy's (and sidecar's) client side. Create inside a running loop; `close()` it."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=settings.pool_per_pod,
            keepalive_timeout=settings.keepalive_s,
            ttl_dns_cache=None,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=settings.connect_timeout_s,
                sock_connect=settings.connect_timeout_s,
            ),
        )

    async def close(self) -> None:
        await self.session.close()

    async def open(
        self,
        endpoint: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        stream: bool,
        first_byte_timeout_s: float | None = None,
    ) -> Opened:
        """POST `body` to the pod. A 5xx is read, released and raised as a retryable failure;
        any other status is returned for the caller to relay."""
        timeout = first_byte_timeout_s or self.settings.first_byte_timeout_s
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                resp = await self.session.post(
                    f"http://{endpoint}{path}", data=body, headers=headers
                )
                if resp.status >= 500:
                    raw = await resp.read()
                    resp.release()
                    raise StatusFailure(endpoint, resp.status, raw)
                first = await resp.content.readany() if stream and resp.status == 200 else b""
        except UpstreamFailure:
            raise
        except TimeoutError:
            if resp is not None:
                resp.close()
            raise UpstreamFailure(
                endpoint, "timeout_first_byte", f"no first byte within {timeout:g}s", False
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamFailure(endpoint, "connect", str(e.os_error), True) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            # Reset or closed before anything reached the client: the pod is gone or restarting.
            if resp is not None:
                resp.close()
            raise UpstreamFailure(endpoint, "reset", repr(e), True) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        return Opened(endpoint, resp, first)

    async def get(self, endpoint: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """A small GET (health, models); raises `UpstreamFailure` on any failure."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.get(f"http://{endpoint}{path}") as resp:
                    return resp.status, await resp.read()
        except TimeoutError:
            raise UpstreamFailure(endpoint, "timeout_total", f"GET {path}", False) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamFailure(endpoint, "connect", repr(e), True) from None


class StatusFailure(UpstreamFailure):
    """A 5xx answer before any byte reached the client; its body is kept for relaying."""

    def __init__(self, endpoint: str, status: int, body: bytes) -> None:
        detail = body[:200].decode("utf-8", "replace")
        super().__init__(endpoint, "status_5xx", f"HTTP {status}: {detail}", True)
        self.status = status
        self.body = body
