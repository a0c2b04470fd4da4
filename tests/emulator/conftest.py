"""Shared pieces of the emulator tests: in-process pods on free loopback ports, SSE parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from router.emulator.server import EmulatorPod
from router.emulator.settings import EmulatorSettings

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
#: Fast pods for wire tests: a small cache and 50× speed.
FAST = EmulatorSettings(port=0, speedup=50.0, num_gpu_blocks=4096)


@pytest.fixture
async def start_pod() -> AsyncIterator[Callable[..., Any]]:
    """`await start_pod(**settings_overrides)` → a running in-process pod (stopped at teardown)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> EmulatorPod:
            pod = EmulatorPod(replace(FAST, **overrides))
            await stack.enter_async_context(pod)
            return pod

        yield start


@pytest.fixture
async def pod(start_pod: Callable[..., Any]) -> EmulatorPod:
    return await start_pod()


@pytest.fixture
async def client(pod: EmulatorPod) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pod.url, timeout=10.0) as c:
        yield c


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    assert text.endswith("\n\n"), text[-50:]
    out: list[Any] = []
    for event in text.split("\n\n")[:-1]:
        assert event.startswith("data: "), event
        payload = event[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)
