"""EmulatorPod: one emulated vLLM pod — sockets, uvicorn servers, KV-event publisher, driver.

`async with EmulatorPod(settings) as pod:` serves in the current event loop (tests use this);
`run_pod(settings)` is the process entry point of `kvroute emulate pod`: it prints one JSON
line `{"event": "ready", ...}` with the bound endpoints once serving, and stops cleanly on
SIGTERM or SIGINT. Only the given host is bound (127.0.0.1 by default); port 0 picks a free
port, reported on the ready line. The admin app (`/admin/faults`) is served only with
`settings.admin_port`, on its own socket (`admin` on the ready line, else null).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from router.emulator.app import build_admin_app, build_api_app, build_side_app
from router.emulator.runtime import PodRuntime
from router.emulator.settings import EmulatorSettings
from router.events.publisher import KVEventPublisher
from router.gc_heap import freeze_startup_heap

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class EmulatorPod:
    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.runtime = PodRuntime(settings)
        # vLLM exposes vllm:lora_requests_info only with LoRA enabled.
        self.runtime.metrics.lora_enabled = bool(settings.lora_adapters)
        self._api: _EmbeddedServer | None = None
        self._side: _EmbeddedServer | None = None
        self._admin: _EmbeddedServer | None = None
        self.admin_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._relisten: asyncio.TimerHandle | None = None
        self._refusing = False
        self.kv_events_endpoint: str | None = None
        self.kv_replay_endpoint: str | None = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        s = self.settings
        rt = self.runtime
        api_sock = _bind(s.host, s.port)
        side_sock = _bind(s.host, s.side_channel_port)
        rt.port = api_sock.getsockname()[1]
        rt.side_port = side_sock.getsockname()[1]
        if s.events_enabled:
            rt.attach_publisher(self._make_publisher())
        rt.driver.start()
        self._api = self._server(build_api_app(rt, self.refuse_connections))
        self._side = self._server(build_side_app(rt, self.refuse_connections))
        serving = [(self._api, api_sock), (self._side, side_sock)]
        if s.admin_port is not None:
            admin_sock = _bind(s.host, s.admin_port)
            self.admin_port = admin_sock.getsockname()[1]
            self._admin = self._server(build_admin_app(rt, self.refuse_connections))
            serving.append((self._admin, admin_sock))
        for server, sock in serving:
            self._tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        while not all(server.started for server, _ in serving):
            for t in self._tasks:
                if t.done():
                    await self.stop()
                    raise RuntimeError(f"emulator pod failed to start: {t.exception()!r}")
            await asyncio.sleep(0.005)

    def _make_publisher(self) -> KVEventPublisher:
        s = self.settings
        rt = self.runtime
        topic = topic_for(s.events_topic, rt.endpoint, rt.model)
        replay = s.events_replay or f"tcp://{s.host}:0"
        if s.events_bind:
            pub = KVEventPublisher(
                s.events_bind,
                topic=topic,
                replay_endpoint=replay,
                buffer_steps=s.events_buffer_steps,
                wire_form=s.events_wire_form,
                data_parallel_rank=0,
                vllm_store_fields=True,
                bind=True,
            )
            self.kv_events_endpoint = pub.endpoint
        else:
            assert s.events_connect is not None
            pub = KVEventPublisher(
                s.events_connect,
                topic=topic,
                replay_endpoint=replay,
                buffer_steps=s.events_buffer_steps,
                wire_form=s.events_wire_form,
                data_parallel_rank=0,
                vllm_store_fields=True,
                bind=False,
                wait_for_subscriber_s=s.events_connect_wait_s,
            )
        self.kv_replay_endpoint = pub.replay_endpoint
        return pub

    def _server(self, app: Any) -> _EmbeddedServer:
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        return _EmbeddedServer(config)

    async def stop(self) -> None:
        if self._relisten is not None:
            self._relisten.cancel()
        for server in (self._api, self._side, self._admin):
            if server is not None:
                server.should_exit = True
        await self.runtime.driver.stop()
        for t in self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await t
        self._tasks.clear()
        rt = self.runtime
        rt.pins.close()
        rt.close()
        await rt.puller.close()
        if rt.publisher is not None:
            rt.publisher.close()
            rt.publisher = None

    async def __aenter__(self) -> EmulatorPod:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- views
    @property
    def endpoint(self) -> str:
        return self.runtime.endpoint

    @property
    def url(self) -> str:
        return f"http://{self.runtime.endpoint}"

    @property
    def side_channel(self) -> str:
        return f"{self.runtime.host}:{self.runtime.side_port}"

    @property
    def admin(self) -> str | None:
        """host:port of the admin app, None when the pod was started without one."""
        if self.admin_port is None:
            return None
        return f"{self.runtime.host}:{self.admin_port}"

    @property
    def admin_url(self) -> str:
        if self.admin is None:
            raise RuntimeError("this pod was started without an admin port (admin_port)")
        return f"http://{self.admin}"

    def ready_info(self) -> dict[str, Any]:
        rt = self.runtime
        return {
            "event": "ready",
            "endpoint": rt.endpoint,
            "role": rt.role.value,
            "model": rt.model,
            "adapters": sorted(rt.adapters),
            "side_channel": self.side_channel,
            "admin": self.admin,
            "kv_events_endpoint": self.kv_events_endpoint,
            "kv_replay_endpoint": self.kv_replay_endpoint,
            "block_size": rt.engine_config.block_size,
            "num_gpu_blocks": rt.engine_config.num_gpu_blocks,
        }

    # ---------------------------------------------------------------- faults
    async def refuse_connections(self, seconds: float) -> None:
        """Stop listening on the API port for `seconds` (0 = listen again now)."""
        server = self._api
        if server is None:
            return
        loop = asyncio.get_running_loop()
        if self._relisten is not None:
            self._relisten.cancel()
            self._relisten = None
        if seconds <= 0:
            await self._listen_again()
            return
        if not self._refusing:
            for srv in server.servers:
                srv.close()
            server.servers = []
            self._refusing = True
        self._relisten = loop.call_later(
            seconds, lambda: self._tasks.append(asyncio.create_task(self._listen_again()))
        )

    async def _listen_again(self) -> None:
        server = self._api
        if server is None or not self._refusing:
            return
        self._refusing = False
        config = server.config
        sock = _bind(self.settings.host, self.runtime.port)

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            # What uvicorn's own startup builds for each connection.
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=server.server_state,
                app_state=server.lifespan.state,
                _loop=_loop,
            )

        srv = await asyncio.get_running_loop().create_server(create_protocol, sock=sock)
        server.servers.append(srv)


def topic_for(template: str, endpoint: str, model: str) -> str:
    """The events topic: `template` with `{endpoint}` (host:port) and `{model}` filled in."""
    try:
        return template.format(endpoint=endpoint, model=model)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"events topic {template!r}: only {{endpoint}} and {{model}} can be filled in ({exc})"
        ) from None


def run_pod(settings: EmulatorSettings) -> int:
    """Serve one pod until SIGTERM/SIGINT; prints the ready line on stdout."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        uvloop = None  # type: ignore[assignment]
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(_serve(settings))


async def _serve(settings: EmulatorSettings) -> int:
    pod = EmulatorPod(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await pod.start()
    freeze_startup_heap()
    sys.stdout.write(json.dumps(pod.ready_info()) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await pod.stop()
    return 0
