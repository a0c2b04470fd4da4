"""The proxy's ASGI application and its lifetime: `ProxyApp` and `serve()`.

A FastAPI app serves the control endpoints (`/health`, `/ready`, `/metrics`, `/v1/models`,
`/debug/pods`); the two inference endpoints go straight to `Forwarder` as raw ASGI, in front
of FastAPI's routing, because they are the hot path. The lifespan owns the upstream
connection pool, the health prober and the fleet's state feeds (`feeds.FleetFeeds`: metrics
scraper, KV-event subscriber, static discovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from router.config import RouterConfig
from router.config_reload import face_reloader, face_scheduler
from router.feeds import FleetFeeds
from router.gc_heap import freeze_startup_heap
from router.index import BlockIndex
from router.loop_lag import LoopLagCollector
from router.ops_settings import make_tracing
from router.pods import PodRegistry
from router.proxy.errors import UpstreamFailure, error_headers, error_json
from router.proxy.forward import Forwarder
from router.proxy.health import HealthProber
from router.proxy.metrics import ProxyMetrics
from router.proxy.observe import build_forwarder
from router.proxy.relay import Receive, Scope, Send, send_error
from router.proxy.settings import ProxySettings
from router.proxy.upstream import Upstream
from router.request import ChatTemplate, RequestError, path_action
from router.scheduler import Scheduler
from router.shadow_metrics import ShadowCollector

log = logging.getLogger(__name__)

#: The router's own endpoints (never forwarded); every other path follows the request
#: path policy (`router.request.path_action`): routed paths go to a pod, the rest get 404.
CONTROL_PATHS = frozenset({"/health", "/ready", "/metrics", "/debug/pods", "/debug/reuse"})
_CLOSE = ((b"connection", b"close"),)


class ProxyApp:
    """ASGI app of `kvroute proxy`. Build it, then serve it with uvicorn (see `serve`)."""

    def __init__(
        self,
        config: RouterConfig,
        settings: ProxySettings | None = None,
        registry: PodRegistry | None = None,
        chat_template: ChatTemplate | None = None,
        config_path: str | Path | None = None,
        freeze_heap: bool = False,
        tracing: Any = None,
    ) -> None:
        """`config_path`: re-read its `pods:` when the file changes (static discovery), and
        the rest of it on SIGHUP or a change (`router.config_reload`).
        `chat_template`: renders chat prompts; default: the one beside the configured
        tokenizer (as every face and the emulator find it), else a plain rendering.
        `freeze_heap`: once started, take what start-up loaded out of the garbage
        collector's passes (`router.gc_heap`); for a process that is only this proxy.
        `tracing`: a `router.tracing.RequestTracing` to use (tests); default: the config's
        `tracing:` section (None when it is off)."""
        self.config = config
        self._freeze_heap = freeze_heap
        self.settings = settings or ProxySettings()
        self.metrics = ProxyMetrics()
        if chat_template is None:
            chat_template = ChatTemplate.beside_tokenizer(config.blocks.tokenizer_path)
        self.chat_template = chat_template
        self.feeds = FleetFeeds(config, registry, config_path)
        # Pool gauges, feed counters, per-pod KV-event gauges, scraped prefix-cache hits.
        self.metrics.face.watch_feeds(self.feeds)
        self.loop_lag = LoopLagCollector("proxy")
        self.metrics.registry.register(self.loop_lag)
        self.registry = self.feeds.registry
        #: OpenTelemetry spans (`router.tracing`); None = off: nothing is wrapped.
        self.tracing = (
            tracing if tracing is not None else make_tracing(config.tracing, "kvroute-proxy")
        )
        self.scheduler = self.build_scheduler(config)
        self.metrics.registry.register(ShadowCollector(lambda: self.scheduler.shadows))
        self.shared_state = _shared_state(config, self.scheduler)
        if self.shared_state is not None:
            self.metrics.watch_shared_state(self.shared_state)
        self.forwarder: Forwarder | None = None
        self.upstream: Upstream | None = None
        self.prober: HealthProber | None = None
        self._models_cache: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])
        #: HTTP requests open now (each holds a client connection): `max_connections`.
        self._open = 0
        self.metrics.face.open_requests.set_function(lambda: self._open)
        self.api = self._build_api()
        #: Applies the config file again on SIGHUP or a change; None without a file.
        from router.proxy.reload import PROXY_LIVE_FIELDS, apply_proxy_reload

        self.reloader = face_reloader(
            config_path,
            config,
            lambda new, change: apply_proxy_reload(self, new, change),
            PROXY_LIVE_FIELDS,
            self.feeds.discovery,
        )
        if self.reloader is not None:
            self.metrics.registry.register(self.reloader)

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in CONTROL_PATHS:
            # Control endpoints stay reachable at the cap (probes and scrapes are cheap).
            await self.api(scope, receive, send)
            return
        cap = self.settings.max_connections
        if cap and self._open >= cap:
            # Refused before reading anything: the cheapest answer, and the socket is freed.
            self.metrics.rejected.labels("max_connections").inc()
            err = RequestError(
                503, f"the proxy is at its limit of {cap} open requests", "max_connections"
            )
            await send_error(send, err, self.settings.retry_after_s, _CLOSE)
            return
        self._open += 1
        try:
            await self._http(scope, receive, send)
        finally:
            self._open -= 1

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            action = path_action(scope["method"], scope["path"], self.config.request)
        except RequestError as err:
            self.metrics.face.refused("-", err.code)
            await send_error(send, err)
            return
        if action == "route" and self.forwarder is not None:
            await self.forwarder(scope, receive, send)
            return
        await self.api(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        self.upstream = Upstream(self.settings)
        if self.tracing is not None:
            self.tracing.trace_upstream(self.upstream)
        self.prober = HealthProber(self.registry, self.upstream, self.settings, self.metrics)
        self.prober.start()
        self.loop_lag.start(asyncio.get_running_loop())
        await self.feeds.start()
        if self.shared_state is not None:
            await self.shared_state.start()
        self.forwarder = build_forwarder(
            self, self.scheduler, self.settings, self.config.logging.access_log
        )
        if self.reloader is not None:
            await self.reloader.start()  # after static discovery's: it takes over SIGHUP
        if self._freeze_heap:
            freeze_startup_heap()

    async def stop(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        self.loop_lag.stop()
        if self.forwarder is not None:
            self.forwarder.tokenize.close()
        self.forwarder = None
        if self.shared_state is not None:
            await self.shared_state.stop()
        await self.feeds.stop()
        if self.prober is not None:
            await self.prober.stop()
        if self.upstream is not None:
            await self.upstream.close()
            self.upstream = None

    def build_scheduler(self, config: RouterConfig, previous: Scheduler | None = None) -> Scheduler:
        """The scheduler for `config` (start-up and reloads alike: `face_scheduler`)."""
        return face_scheduler(config, self.feeds, self.metrics.face, self.tracing, previous)

    # ------------------------------------------------------------------ control endpoints
    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="kvroute proxy",
            lifespan=self.lifespan,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )

        @api.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/ready")
        async def ready() -> Response:
            routable = [p.endpoint for p in self.registry.all() if p.healthy]
            status = 200 if routable else 503
            return JSONResponse({"ready": bool(routable), "routable_pods": routable}, status)

        @api.get("/metrics")
        async def metrics() -> Response:
            for pod in self.registry.all():
                self.metrics.pod_healthy.labels(pod.endpoint).set(1 if pod.healthy else 0)
            forwarder = self.forwarder
            if forwarder is not None:
                for model in self.registry.models():
                    self.metrics.queued.labels(model).set(forwarder.admission.queued(model))
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @api.get("/debug/pods")
        async def debug_pods() -> dict[str, Any]:
            return {"pods": self.pod_report()}

        @api.get("/debug/reuse")
        async def debug_reuse() -> dict[str, Any]:
            return self.metrics.face.reuse.report()

        @api.api_route("/v1/models", methods=["GET", "HEAD"])
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": await self.models()}

        @api.exception_handler(404)
        async def not_found(request: Any, _exc: Any) -> Response:
            err = RequestError(404, f"no route for path '{request.url.path}'", "unknown_path")
            return _error_response(err)

        @api.exception_handler(405)
        async def not_allowed(request: Any, _exc: Any) -> Response:
            err = RequestError(
                405,
                f"{request.url.path} does not accept {request.method}",
                "method_not_allowed",
            )
            return _error_response(err)

        return api

    def pod_report(self) -> list[dict[str, Any]]:
        now = self.scheduler.clock()
        index = self.scheduler.prefix_index()
        sizes = _entries_per_pod(index)
        out = []
        for p in self.registry.all():
            age = p.metrics.age(now)
            out.append(
                {
                    "endpoint": p.endpoint,
                    "role": p.role.value,
                    "models": sorted(p.models),
                    "adapters": sorted(p.adapters),
                    "labels": p.labels,
                    "healthy": p.healthy,
                    "ejected": bool(self.prober and p.endpoint in self.prober.ejected),
                    "metrics": {
                        "waiting": p.metrics.waiting,
                        "running": p.metrics.running,
                        "kv_utilization": p.metrics.kv_utilization,
                        "age_s": None if age == float("inf") else round(age, 3),
                        "stale": p.metrics.stale,
                        "process_start_time": p.metrics.process_start_time,
                        "prefix_cache_queries": p.metrics.prefix_cache_queries,
                        "prefix_cache_hits": p.metrics.prefix_cache_hits,
                    },
                    "inflight_requests": p.inflight_requests,
                    "inflight_prefill_tokens": p.inflight_prefill_tokens,
                    "inflight_prefilling": p.inflight_prefilling,
                    "index_blocks": sizes.get(p.endpoint, 0),
                    "kv_events": self.feeds.feed_report(p.endpoint),
                }
            )
        return out

    async def models(self) -> list[dict[str, Any]]:
        """The union of every pod's `/v1/models` (cached briefly); the config's names for pods
        that do not answer."""
        loop = asyncio.get_running_loop()
        at, cached = self._models_cache
        if loop.time() - at < self.settings.models_cache_s:
            return cached
        seen: dict[str, dict[str, Any]] = {}
        if self.upstream is not None:
            pods = [p for p in self.registry.all() if p.healthy]
            answers = await asyncio.gather(
                *(self._pod_models(p.endpoint) for p in pods), return_exceptions=True
            )
            for answer in answers:
                if isinstance(answer, list):
                    for m in answer:
                        if isinstance(m, dict) and isinstance(m.get("id"), str):
                            seen.setdefault(m["id"], m)
        for name in sorted(self.registry.models()):
            seen.setdefault(name, {"id": name, "object": "model", "owned_by": "kvroute"})
        data = list(seen.values())
        self._models_cache = (loop.time(), data)
        return data

    async def _pod_models(self, endpoint: str) -> list[Any]:
        assert self.upstream is not None
        try:
            status, body = await self.upstream.get(endpoint, "/v1/models", 2.0)
        except UpstreamFailure:
            return []
        if status != 200:
            return []
        try:
            data = msgspec.json.decode(body).get("data")
        except (msgspec.DecodeError, AttributeError):
            return []
        return data if isinstance(data, list) else []


def _shared_state(config: RouterConfig, scheduler: Scheduler) -> Any:
    """The `RedisSync` of the config's `shared_state:` section, or None without one."""
    if config.shared_state is None:
        return None
    from router.shared_state.redis_sync import RedisSync

    return RedisSync(scheduler, config.shared_state)


def _error_response(err: RequestError) -> Response:
    """An error of the control endpoints, in the same vLLM shape as the forwarded ones."""
    headers = {k.decode(): v.decode() for k, v in error_headers(err, 1) if k != b"content-type"}
    return JSONResponse(error_json(err), err.status, headers)


def _entries_per_pod(index: BlockIndex) -> dict[str, int]:
    return {pod: index.pod_block_count(pod) for pod in index.pods()}


def uvicorn_config(app: Any, host: str, port: int, access_log: bool = False) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=access_log,
        log_level="warning",
        # uvicorn's lines go through the process's logging set-up (router.log_setup: its
        # format, JSON included), not handlers of uvicorn's own.
        log_config=None,
        # We are the edge of our own hop: no X-Forwarded-* rewriting, no Server/Date headers.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=5,
        # Idle client connections stay open longer than client pools keep them (aiohttp 15 s,
        # httpx 5 s): with uvicorn's 5 s a client reusing a connection the proxy was closing
        # saw ServerDisconnectedError (1 request in 278 of a Mooncake open loop). nginx's
        # default, 75 s.
        timeout_keep_alive=75,
    )


async def serve(
    app: Any,
    host: str,
    port: int,
    access_log: bool = False,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve `app` until SIGTERM/SIGINT, then shut down gracefully and return.

    `sockets`: already-listening sockets to accept from instead of binding host:port (the
    workers of `kvroute proxy --workers N` share their supervisor's).

    uvicorn re-raises the signal it stopped for once it is done, under the handlers that were
    in place before it started; ours ignore it, so the process exits 0 after a clean stop.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _already_stopped)
    server = uvicorn.Server(uvicorn_config(app, host, port, access_log))
    await server.serve(sockets=sockets)


def _already_stopped(_sig: int, _frame: Any) -> None:
    log.info("shut down after a signal")


class RunningServer:
    """An ASGI app served on 127.0.0.1 inside the current loop (tests, demo, benchmarks)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> RunningServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it; uvicorn does not set it on a socket it is handed, and
        # without it a response's header and body writes meet delayed ACKs (~40 ms each).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn_config(self.app, self.host, self.port)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await self._task
