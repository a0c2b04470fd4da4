"""EchoPod: a tiny OpenAI-shaped model server for the Envoy tests (a test fixture, not a model).

Answers `/v1/chat/completions` and `/v1/completions` with JSON or SSE that name the pod that
served them (`served_by`) and the request headers it received, `/v1/models`, and a vLLM-style
`/metrics` page so the picker's scraper sees it as healthy. SSE chunks are spaced
`chunk_interval_s` apart so tests can see them arrive one by one. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "test-model"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class EchoPod:
    chunk_interval_s: float = 0.05
    chunks: int = 4
    host: str = "127.0.0.1"
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None
    _sock: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._complete, methods=["POST"]),
                Route("/v1/completions", self._complete, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ]
        )

    async def start(self) -> None:
        if self._sock is None:
            self._sock = socket.socket()
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((self.host, self.port))
            self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving and close the listening socket (the port refuses connections)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _complete(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.url.path, headers, body))
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": self.chunks,
            "total_tokens": 11 + self.chunks,
        }
        if body.get("stream"):
            return StreamingResponse(self._sse(usage), media_type="text/event-stream")
        return JSONResponse(
            {
                "object": "chat.completion",
                "served_by": self.endpoint,
                "headers": headers,
                "body_bytes": len(raw),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": usage,
            }
        )

    async def _sse(self, usage: dict[str, int]) -> AsyncIterator[bytes]:
        for i in range(self.chunks):
            chunk = {"served_by": self.endpoint, "i": i, "choices": [{"delta": {"content": "t"}}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(self.chunk_interval_s)
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def _models(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.url.path, headers, None))
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": MODEL, "object": "model"}],
                "served_by": self.endpoint,
            }
        )

    async def _metrics(self, request: Request) -> Response:
        return PlainTextResponse(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{MODEL}"}} 0\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0.1\n'
        )
