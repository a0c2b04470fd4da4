"""PickerServer: `kvroute serve` — the ext_proc picker with its health, metrics and state feeds.

Owns the process wiring: pod registry (from the config's `pods:`, re-read when the file
changes), metrics scraper, KV-event subscriber feeding the scheduler's precise index (connect
mode when pods name a `kv_events_endpoint`, bind mode when the config has an `events`
section), the ext_proc gRPC server, the gRPC health server and the Prometheus endpoint, and the
order they start and stop in.

Readiness (`readiness` and the ExternalProcessor service, answered on the health port and on
the ext_proc port, where Envoy's own health check asks) is NOT_SERVING until the pod list is
loaded and scraped once and the pods' KV-event replay buffers are applied (warm start, bounded
by `events.replay_timeout_s`), and again from the moment shutdown begins.

Shutdown on SIGTERM, in three steps: (1) lame duck — readiness NOT_SERVING, new streams still
served for `lame_duck_s`, so Kubernetes endpoints and Envoy health checks move traffic away
before anything is refused; (2) drain — the gRPC server refuses new streams (GOAWAY; Envoy
answers those clients 503 JSON) and open ones run to their end for up to `grace_period_s`;
(3) the feeds and the health and metrics servers stop. A second SIGTERM/SIGINT ends the lame
duck at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from envoy_extproc.metrics import PickerMetrics
from envoy_extproc.metrics_http import MetricsHTTPServer
from envoy_extproc.observe import build_picker
from envoy_extproc.passive_health import PassiveHealth
from envoy_extproc.servicer import ExternalProcessorServicer, add_to_server
from envoy_extproc.settings import ExtProcSettings
from router.config import RouterConfig
from router.config_reload import face_reloader, face_scheduler
from router.discovery.kubernetes import KubernetesDiscoverySettings
from router.feeds import FleetFeeds
from router.gc_heap import freeze_startup_heap
from router.loop_lag import LoopLagCollector
from router.ops_settings import make_tracing
from router.scheduler import Scheduler
from router.shadow_metrics import ShadowCollector

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
#: Services the health server answers for; all but liveness follow readiness.
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, slots=True)
class BoundPorts:
    grpc: int
    health: int
    metrics: int
    kv_events: str | None


class PickerServer:
    def __init__(
        self,
        config: RouterConfig,
        settings: ExtProcSettings | None = None,
        config_path: str | Path | None = None,
        kubernetes: KubernetesDiscoverySettings | None = None,
        served_models: Collection[str] = (),
        freeze_heap: bool = False,
        tracing: Any = None,
    ) -> None:
        """`config_path`: re-read its `pods:` when the file changes (static discovery), and
        the rest of it on SIGHUP or a change (`router.config_reload`). `kubernetes`: take
        the pods from the Kubernetes API instead (the InferencePool's selector); readiness
        then waits for the first pod list. `served_models`: model names allowed as metric
        label values besides those the pods list. `freeze_heap`: once started, take what
        start-up loaded out of the garbage collector's passes (`router.gc_heap`); for a
        process that is only this picker. `tracing`: a `router.tracing.RequestTracing` to
        use (tests); default: the config's `tracing:` section (None when it is off)."""
        self.config = config
        self._freeze_heap = freeze_heap
        self.settings = settings or ExtProcSettings()
        self.feeds = FleetFeeds(config, config_path=config_path, kubernetes=kubernetes)
        if self.feeds.subscriber is not None:
            # A restarted picker learns what the pods already cache from their replay buffers
            # instead of routing on an empty precise index.
            self.feeds.subscriber.warm_start = True
        self.registry = self.feeds.registry
        pool_name = kubernetes.pool_name if kubernetes is not None else None
        self.metrics = PickerMetrics(pool_name=pool_name or "kvroute", models=served_models)
        self.metrics.watch_feeds(self.feeds)
        self.loop_lag = LoopLagCollector("extproc")
        self.metrics.registry.register(self.loop_lag)
        self.metrics.registry.register(ShadowCollector(lambda: self.scheduler.shadows))
        #: OpenTelemetry spans (`router.tracing`); None = off: nothing is wrapped.
        self.tracing = (
            tracing if tracing is not None else make_tracing(config.tracing, "kvroute-picker")
        )
        self.scheduler = self.build_scheduler(config)
        self.shared_state = None
        if config.shared_state is not None:
            from router.shared_state.redis_sync import RedisSync

            self.shared_state = RedisSync(self.scheduler, config.shared_state)
            self.metrics.watch_shared_state(self.shared_state)
        self.passive_health = (
            PassiveHealth(self.registry, self.settings.outlier_policy())
            if self.settings.passive_health
            else None
        )
        self._readmit_task: asyncio.Task[None] | None = None
        self.picker = build_picker(self, self.scheduler, self.settings, config)
        self.servicer = ExternalProcessorServicer(self.picker)
        #: Applies the config file again on SIGHUP or a change; None without a file.
        from envoy_extproc.observe import EXTPROC_LIVE_FIELDS, apply_serve_reload

        self.reloader = face_reloader(
            config_path,
            config,
            lambda new, change: apply_serve_reload(self, new, change),
            EXTPROC_LIVE_FIELDS,
            self.feeds.discovery,
        )
        if self.reloader is not None:
            self.metrics.registry.register(self.reloader)
        self.health = health_aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_server: MetricsHTTPServer | None = None
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stopped = False
        self.ports: BoundPorts | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> BoundPorts:
        """Start every part; if one fails to start, stop those already running (the shared
        state's reader, the feeds, the servers) and raise."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> BoundPorts:
        s = self.settings
        await self._set_ready(False)
        self._health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        health_port = self._health_server.add_insecure_port(f"{s.host}:{s.health_port}")
        await self._health_server.start()
        await self.health.set("liveness", _SERVING)
        self.loop_lag.start(asyncio.get_running_loop())

        self._metrics_server = MetricsHTTPServer(
            self.metrics.registry,
            s.host,
            s.metrics_port,
            debug={"/debug/reuse": self.metrics.reuse.report},
        )
        metrics_port = await self._metrics_server.start()

        await self.feeds.start()
        if self.shared_state is not None:
            await self.shared_state.start()
        sub = self.feeds.subscriber
        if sub is not None and not await sub.warmed(sub.settings.replay_timeout_s + 1):
            log.warning("kvroute picker: ready before every pod's replay buffer was applied")

        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ]
        )
        add_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        grpc_port = self._grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        await self._grpc.start()
        if self.passive_health is not None:
            self._readmit_task = asyncio.create_task(self._readmit_loop(self.passive_health))
        if self._freeze_heap:
            freeze_startup_heap()
        if self.reloader is not None:
            await self.reloader.start()  # after static discovery's: it takes over SIGHUP
        await self._set_ready(True)
        self.ports = BoundPorts(
            grpc_port,
            health_port,
            metrics_port,
            self.feeds.subscriber.endpoint if self.feeds.subscriber is not None else None,
        )
        log.info(
            "kvroute picker: ext_proc :%d, health :%d, metrics :%d, %d pods",
            grpc_port,
            health_port,
            metrics_port,
            len(self.registry),
        )
        return self.ports

    async def stop(self, grace_s: float | None = None, lame_duck_s: float = 0.0) -> None:
        """Turn not-ready, keep serving for `lame_duck_s`, then stop taking streams, let open
        ones finish (`grace_s`, default `grace_period_s`), stop the feeds."""
        if self._stopped:
            return
        self._stopped = True
        if self.reloader is not None:
            await self.reloader.stop()
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        await self._set_ready(False)
        if lame_duck_s > 0 and self._grpc is not None:
            log.info("kvroute picker: not ready; lame duck for %.1f s", lame_duck_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), lame_duck_s)
            log.info("kvroute picker: draining %d open streams", self.servicer.active)
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        if self._readmit_task is not None:
            self._readmit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readmit_task
            self._readmit_task = None
        if self.shared_state is not None:
            await self.shared_state.stop()
        await self.feeds.stop()
        self.loop_lag.stop()
        self.picker.tokenize.close()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop gracefully."""
        try:
            await self.start()
        except BaseException:
            await self.stop(0)
            raise
        loop = asyncio.get_running_loop()
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop.wait()
        finally:
            log.info("kvroute picker: stopping (%d open streams)", self.servicer.active)
            try:
                await self.stop(lame_duck_s=self.settings.lame_duck_s)
            finally:
                if on_main:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        """What SIGTERM does: begin the shutdown; a second call ends the lame duck early."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def __aenter__(self) -> PickerServer:
        try:
            await self.start()
        except BaseException:
            await self.stop(0)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def build_scheduler(self, config: RouterConfig, previous: Scheduler | None = None) -> Scheduler:
        """The scheduler for `config` (start-up and reloads alike: `face_scheduler`)."""
        return face_scheduler(config, self.feeds, self.metrics, self.tracing, previous)

    # ------------------------------------------------------------------ helpers
    async def _readmit_loop(self, health: PassiveHealth) -> None:
        """Let ejected pods back once their ejection is over and a scrape went fine."""
        while True:
            await asyncio.sleep(0.25)
            health.tick()

    async def _set_ready(self, ready: bool) -> None:
        status = _SERVING if ready else _NOT_SERVING
        for name in HEALTH_SERVICES:
            if name != "liveness":
                await self.health.set(name, status)
