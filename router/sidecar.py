"""`kvroute sidecar`: the decode-side sidecar of Envoy/Istio P/D deployments.

It sits beside one decode pod, forwards every request to it, and when an inference request
carries `x-prefiller-host-port: host:port` (set by the endpoint picker), first runs the prefill
leg on that host (the two-phase flow of `router/proxy/pd.py`, shared with the proxy), then sends
the decode leg with the returned `kv_transfer_params`. The header is removed before anything is
forwarded. Prefill hosts must be in the allowlist (a static list and/or the pods a router's
`/debug/pods` lists as prefill-capable), compared after normalisation (`canonical_endpoint`);
any other gets 403 and more than one value 400, so a client cannot make the sidecar send
requests to an address of its choosing. The leg goes to the allowlist's own spelling of the pod.

Router-only body fields (`kv_transfer_params`, see `RequestSettings.strip_fields`) are removed
from every client body: the decode pod only ever sees the `kv_transfer_params` the chosen
prefill pod returned, and a failed prefill leg falls back to local prefill with the client's
body without them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import uvloop
from fastapi import FastAPI
from fastapi.responses import Response

from router.discovery.pod_list import PodListError, check_endpoint
from router.proxy.app import serve
from router.proxy.errors import UpstreamFailure
from router.proxy.metrics import ProxyMetrics
from router.proxy.pd import PrefillFailed, decode_body, run_prefill
from router.proxy.relay import (
    BrokenStream,
    ClientWatch,
    Receive,
    Scope,
    Send,
    deliver_full,
    deliver_stream,
    read_body,
    send_error,
    send_full,
)
from router.proxy.settings import ProxySettings
from router.proxy.upstream import Upstream, forwarded_headers
from router.request import RequestError, RequestSettings, strip_router_fields

log = logging.getLogger(__name__)

PREFILL_HEADER = b"x-prefiller-host-port"
_REQUEST_DEFAULTS = RequestSettings()
#: Names of the loopback host, compared as one.
_LOCALHOST = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


def canonical_endpoint(endpoint: str) -> str | None:
    """`host:port` in one spelling per address, for comparing endpoints; None if malformed.

    Case and trailing dots of host names, IPv6 brackets and zero-compression, IPv4-mapped
    IPv6, leading zeros of the port, surrounding blanks and the loopback aliases
    (`localhost`, 127.0.0.1, ::1) are all folded. Anything with userinfo, a path or a zone is
    malformed, not guessed at.
    """
    text = endpoint.strip().lower()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    bracketed = host.startswith("[")
    if bracketed:
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address must be bracketed: "::1:80" is ambiguous
        return None
    host = host.rstrip(".")
    if not host or any(c in host for c in "@/?#%[] \t,"):
        return None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            return None
    else:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        host = addr.compressed
    if host in _LOCALHOST:
        host = "localhost"
    return f"{host}:{int(port)}"


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    host: str = "127.0.0.1"
    port: int = 8100
    #: The local decode pod (host:port).
    decode: str = "127.0.0.1:8000"
    #: Prefill pods (host:port) the sidecar may send prefill legs to.
    allow: tuple[str, ...] = ()
    #: A router's `/debug/pods` URL; its prefill and both-role pods are allowed too.
    registry_url: str | None = None
    registry_refresh_s: float = 5.0
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 60.0
    total_timeout_s: float = 600.0
    max_body_bytes: int = 16 * 1024 * 1024
    #: Inference paths (the P/D flow and field stripping apply); the rest pass through.
    routed_paths: tuple[str, ...] = _REQUEST_DEFAULTS.routed_paths
    #: Router-only body fields removed from client bodies (`request.strip_fields`).
    strip_fields: tuple[str, ...] = _REQUEST_DEFAULTS.strip_fields

    def __post_init__(self) -> None:
        for ep in self.allow:
            check_endpoint(ep, "sidecar.allow")
            if canonical_endpoint(ep) is None:
                raise ValueError(f"sidecar.allow: {ep!r} is not 'host:port'")
        check_endpoint(self.decode, "sidecar.decode")
        if self.registry_refresh_s <= 0:
            raise ValueError("sidecar.registry_refresh_s must be > 0")

    def upstream_settings(self) -> ProxySettings:
        return ProxySettings(
            connect_timeout_s=self.connect_timeout_s,
            first_byte_timeout_s=self.first_byte_timeout_s,
            total_timeout_s=self.total_timeout_s,
        )


class PrefillAllowlist:
    """The static list plus what the router's registry says (refreshed in the background)."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        #: canonical endpoint → the spelling the list gave (where the prefill leg goes).
        self.static = _by_canonical(settings.allow)
        self.from_registry: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def lookup(self, endpoint: str) -> str | None:
        """The allowed pod `endpoint` names (in the list's spelling), or None."""
        key = canonical_endpoint(endpoint)
        if key is None:
            return None
        return self.static.get(key) or self.from_registry.get(key)

    def __contains__(self, endpoint: object) -> bool:
        return isinstance(endpoint, str) and self.lookup(endpoint) is not None

    async def start(self, session: aiohttp.ClientSession) -> None:
        if self.settings.registry_url:
            await self.refresh(session)
            self._task = asyncio.create_task(self._run(session), name="sidecar-allowlist")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        url = self.settings.registry_url
        assert url is not None
        try:
            async with asyncio.timeout(2.0), session.get(url) as resp:
                doc = msgspec.json.decode(await resp.read()) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as e:
            log.warning("sidecar: cannot read registry %s (%r); keeping the last list", url, e)
            return
        pods = doc.get("pods") if isinstance(doc, dict) else None
        if not isinstance(pods, list):
            log.warning("sidecar: registry %s has no 'pods' list; keeping the last list", url)
            return
        allowed = set()
        for p in pods:
            if isinstance(p, str):
                allowed.add(p)
            elif isinstance(p, dict) and p.get("role", "both") in ("prefill", "both"):
                ep = p.get("endpoint")
                if isinstance(ep, str):
                    allowed.add(ep)
        self.from_registry = _by_canonical(allowed)

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_refresh_s)
            await self.refresh(session)


class SidecarApp:
    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.metrics = ProxyMetrics(prefix="kvroute_sidecar")
        self.allowlist = PrefillAllowlist(settings)
        self.upstream: Upstream | None = None
        self.api = self._build_api()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.upstream is None:
            await self.api(scope, receive, send)
        elif scope["path"] in self.settings.routed_paths and scope["method"] == "POST":
            await self._inference(scope, receive, send)
        elif scope["path"] in ("/sidecar/health", "/sidecar/metrics"):
            await self.api(scope, receive, send)
        else:
            await self._pass_through(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        self.upstream = Upstream(self.settings.upstream_settings())
        await self.allowlist.start(self.upstream.session)
        try:
            yield
        finally:
            await self.allowlist.stop()
            await self.upstream.close()
            self.upstream = None

    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="kvroute sidecar",
            lifespan=self.lifespan,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )

        @api.get("/sidecar/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/sidecar/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        return api

    async def _inference(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self.upstream
        assert upstream is not None
        s = self.settings
        status = 500
        watch: ClientWatch | None = None
        try:
            raw = await read_body(receive, s.max_body_bytes)
            headers = scope["headers"]
            prefill = self._prefill_target(headers)
            fwd = forwarded_headers(headers)
            watch = ClientWatch(receive)
            doc = _json_object(raw)
            body = raw
            stripped = strip_router_fields(doc, s.strip_fields)
            if stripped:
                for name in stripped:
                    self.metrics.stripped_fields.labels(name).inc()
                body = msgspec.json.encode(doc)
            stream = doc.get("stream") is True
            if prefill is not None:
                body = await self._prefill(prefill, scope["path"], doc, fwd)
            status = await self._decode(scope["path"], body, fwd, stream, send, watch)
        except RequestError as err:
            status = err.status
            await send_error(send, err)
        except asyncio.CancelledError:
            if watch is None or not watch.absorb_cancel():
                raise
            status = 499
            self.metrics.client_disconnects.inc()
        finally:
            if watch is not None:
                watch.close()
            self.metrics.count_request("all", status)

    def _prefill_target(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The allowed prefill pod the request names, None without the header; raises
        400 for more than one value and 403 for a host that is not an allowed pod."""
        values = [
            part.strip()
            for k, v in headers
            if k == PREFILL_HEADER
            for part in v.decode("latin-1").split(",")
        ]
        if not values:
            return None
        if len(values) > 1:
            self.metrics.rejected.labels("prefill_header_repeated").inc()
            raise RequestError(
                400,
                f"{PREFILL_HEADER.decode()} must name one prefill pod, got {len(values)}",
                "prefill_target_repeated",
            )
        target = self.allowlist.lookup(values[0])
        if target is None:
            self.metrics.rejected.labels("prefill_not_allowed").inc()
            raise RequestError(
                403,
                f"prefill host '{values[0]}' is not an allowed prefill pod",
                "prefill_target_not_allowed",
            )
        return target

    async def _prefill(self, prefill: str, path: str, doc: dict[str, Any], fwd: dict) -> bytes:
        assert self.upstream is not None
        try:
            params = await run_prefill(
                self.upstream, prefill, path, doc, fwd, self.settings.first_byte_timeout_s
            )
        except PrefillFailed as e:
            self.metrics.pd_requests.labels("prefill_failed").inc()
            log.info("prefill on %s failed, decoding locally: %s", prefill, e.reason)
            return decode_body(doc, None)
        self.metrics.pd_requests.labels("two_phase").inc()
        return decode_body(doc, params)

    async def _decode(
        self, path: str, body: bytes, fwd: dict, stream: bool, send: Send, watch: ClientWatch
    ) -> int:
        assert self.upstream is not None
        s = self.settings
        deadline = asyncio.get_running_loop().time() + s.total_timeout_s
        try:
            opened = await self.upstream.open(s.decode, path, body, fwd, stream)
            if stream:
                result = await deliver_stream(opened, send, deadline, (), watch)
            else:
                result = await deliver_full(opened, send, deadline, (), watch)
        except BrokenStream as f:
            self.metrics.upstream_failures.labels(f.endpoint, f.kind).inc()
            return 502
        except UpstreamFailure as f:
            self.metrics.upstream_failures.labels(f.endpoint, f.kind).inc()
            err = f.to_request_error()
            await send_error(send, err)
            return err.status
        return result.status

    async def _pass_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anything but inference (models, health, metrics...) goes to the pod unchanged."""
        assert self.upstream is not None
        body = await read_body(receive, self.settings.max_body_bytes)
        url = f"http://{self.settings.decode}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            async with (
                asyncio.timeout(self.settings.first_byte_timeout_s),
                self.upstream.session.request(
                    scope["method"],
                    url,
                    data=body or None,
                    headers=forwarded_headers(scope["headers"]),
                ) as resp,
            ):
                data = await resp.read()
                ctype = resp.headers.get("content-type", "application/octet-stream")
                await send_full(send, resp.status, [(b"content-type", ctype.encode())], data)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            await send_error(
                send, RequestError(502, f"decode pod unreachable: {e!r}", "upstream_error")
            )


def _by_canonical(endpoints: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for ep in endpoints:
        key = canonical_endpoint(ep)
        if key is not None:
            out.setdefault(key, ep)
    return out


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise RequestError(400, f"body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "body must be a JSON object", "invalid_json")
    return doc


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sidecar",
        help="decode-pod sidecar: runs the P/D prefill leg named by x-prefiller-host-port",
    )
    p.add_argument("--decode", required=True, help="the local decode pod, host:port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an allowed prefill pod (repeatable)",
    )
    p.add_argument(
        "--registry-url",
        default=None,
        help="a kvroute router's /debug/pods URL; its prefill-capable pods are allowed",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        settings = SidecarSettings(
            host=args.host,
            port=args.port,
            decode=args.decode,
            allow=tuple(args.allow),
            registry_url=args.registry_url,
        )
    except (ValueError, PodListError) as e:
        print(f"kvroute sidecar: {e}", file=sys.stderr)
        return 2
    if not settings.allow and not settings.registry_url:
        log.warning("no --allow and no --registry-url: every prefill request will get 403")
    uvloop.run(serve(SidecarApp(settings), settings.host, settings.port))
    return 0
