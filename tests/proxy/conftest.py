"""Fixtures: fake vLLM pods on loopback and a proxy in front of them, torn down per test.

`FakePod` is a small vLLM-shaped pod whose failures a test switches on. Real HTTP over loopback
(aiohttp's server), so the proxy meets real resets, refusals and slow sockets. `mode`: "ok",
"error500", "die_mid_stream" (two chunks, then the connection is aborted), "slow" (waits
`delay_s` before answering), "prefill_fails" (500 on prefill legs). In every mode a request
whose body holds `POISON` (a prompt the engine chokes on) gets a 500 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from router.config import RouterConfig, parse_config
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


#: A request whose body holds this answers 500 whatever the mode (a poison request).
POISON = "POISON-500"


@dataclass
class FakePod:
    model: str = "m"
    mode: str = "ok"
    delay_s: float = 0.0
    token_delay_s: float = 0.0
    healthy: bool = True
    #: Reported as vllm:num_requests_waiting (saturation tests).
    waiting: int = 0
    received: list[Received] = field(default_factory=list)
    client_gone: int = 0
    completed: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakePod:
        app = web.Application()
        app.router.add_post("/v1/completions", self._infer)
        app.router.add_post("/v1/chat/completions", self._infer)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _req: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, _req: web.Request) -> web.Response:
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{self.model}"}} 0\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{self.model}"}} {self.waiting}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="{self.model}"}} 0.1\n'
        )
        return web.Response(text=text)

    async def _models(self, _req: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        )

    async def _infer(self, req: web.Request) -> web.StreamResponse:
        raw = await req.read()
        body = json.loads(raw)
        self.received.append(Received(req.path, body, dict(req.headers)))
        kv = body.get("kv_transfer_params") or {}
        if POISON.encode() in raw:
            return web.json_response(
                {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}},
                status=500,
            )
        if self.mode == "error500" or (self.mode == "prefill_fails" and kv.get("do_remote_decode")):
            return web.json_response(
                {"error": {"message": "engine crashed", "type": "server_error", "code": 500}},
                status=500,
            )
        if self.mode == "slow":
            await asyncio.sleep(self.delay_s)
        if kv.get("do_remote_decode"):
            return web.json_response(
                self._answer(body, 1, "prefill")
                | {
                    "kv_transfer_params": {
                        "do_remote_prefill": True,
                        "do_remote_decode": False,
                        "remote_engine_id": f"engine-{self.port}",
                        "remote_block_ids": [1, 2, 3],
                        "remote_host": "127.0.0.1",
                        "remote_port": 5600,
                        "tp_size": 1,
                    }
                }
            )
        n = body.get("max_tokens") or body.get("max_completion_tokens") or 4
        chat = req.path.endswith("chat/completions")
        if not body.get("stream"):
            self.completed += 1
            return web.json_response(self._answer(body, n, "tok " * n, chat))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(req)
        try:
            for i in range(n):
                if self.mode == "die_mid_stream" and i == 2:
                    assert req.transport is not None
                    req.transport.abort()
                    return resp
                delta = {"content": "tok "} if chat else None
                choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": "tok "}
                chunk = {
                    "id": f"cmpl-{self.port}",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [choice],
                }
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "id": f"cmpl-{self.port}",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
                }
                await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.client_gone += 1
            raise
        self.completed += 1
        return resp

    def _answer(self, body: dict[str, Any], n: int, text: str, chat: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": f"cmpl-{self.port}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
            "served_by": self.endpoint,
        }


TEST_SETTINGS = ProxySettings(
    health_interval_s=0.05,
    health_timeout_s=0.5,
    connect_timeout_s=1.0,
    first_byte_timeout_s=2.0,
    total_timeout_s=5.0,
)

PD_PLUGINS = """
plugins:
  - type: pd-profile-handler
    parameters: {threshold: 0}
  - type: decode-filter
  - type: prefill-filter
  - type: prefix-cache-scorer
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: decode
    plugins:
      - {pluginRef: decode-filter}
      - {pluginRef: prefix-cache-scorer, weight: 2}
      - {pluginRef: queue-scorer, weight: 1}
      - {pluginRef: max-score-picker}
  - name: prefill
    plugins:
      - {pluginRef: prefill-filter}
      - {pluginRef: prefix-cache-scorer, weight: 2}
      - {pluginRef: max-score-picker}
"""


def fleet_config(
    pods: list[FakePod], roles: list[str] | None = None, extra_yaml: str = ""
) -> RouterConfig:
    lines = ["pods:"]
    for i, p in enumerate(pods):
        role = roles[i] if roles else "both"
        lines.append(f"  - {{endpoint: '{p.endpoint}', models: [{p.model}], role: {role}}}")
    lines.append("blocks: {mode: chars, chars_per_block: 16}")
    lines.append("scrape: {interval_s: 0.1}")
    lines.append("seed: 7")
    text = "\n".join(lines) + "\n" + extra_yaml
    if roles:
        text += PD_PLUGINS
    return parse_config(text, "<test>")


@contextlib.asynccontextmanager
async def running_proxy(
    pods: list[FakePod],
    roles: list[str] | None = None,
    extra_yaml: str = "",
    **overrides: object,
) -> AsyncIterator[tuple[ProxyApp, httpx.AsyncClient]]:
    settings = dataclasses.replace(TEST_SETTINGS, **overrides)
    app = ProxyApp(fleet_config(pods, roles, extra_yaml), settings)
    async with (
        RunningServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10.0) as client,
    ):
        yield app, client


@pytest.fixture
async def pods() -> AsyncIterator[list[FakePod]]:
    started = [await FakePod().start() for _ in range(2)]
    yield started
    for p in started:
        await p.stop()


@pytest.fixture
def proxy() -> Callable[
    ..., contextlib.AbstractAsyncContextManager[tuple[ProxyApp, httpx.AsyncClient]]
]:
    """`async with proxy(pods, roles=None, **settings) as (app, client)`."""
    return running_proxy


@pytest.fixture
async def make_pod() -> AsyncIterator[Callable[..., Any]]:
    """`await make_pod(**fields)` starts another FakePod, stopped at the end of the test."""
    started: list[FakePod] = []

    async def make(**fields: Any) -> FakePod:
        pod = await FakePod(**fields).start()
        started.append(pod)
        return pod

    yield make
    for p in started:
        await p.stop()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def until() -> Callable[..., Any]:
    """`await until(predicate, timeout_s=5)`."""
    return wait_until
