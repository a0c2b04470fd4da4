"""Shared pieces of the KV-event tests: event builders and a wait-until helper."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from router.events.types import BlockStored


def _stored_chain(
    tokens: list[int],
    block_size: int = 16,
    first_hash: int = 1000,
    parent: int | bytes | None = None,
    per_event: int | None = None,
    medium: str | None = "GPU",
    lora_name: str | None = None,
) -> list[BlockStored]:
    """BlockStored events for the full blocks of `tokens`, chained like vLLM emits them."""
    n = len(tokens) // block_size
    per_event = per_event or n
    events = []
    for start in range(0, n, per_event):
        count = min(per_event, n - start)
        hashes = [first_hash + start + i for i in range(count)]
        events.append(
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=parent,
                token_ids=tokens[start * block_size : (start + count) * block_size],
                block_size=block_size,
                medium=medium,
                lora_name=lora_name,
            )
        )
        parent = hashes[-1]
    return events


@pytest.fixture
def stored_chain() -> Callable[..., list[BlockStored]]:
    return _stored_chain


@pytest.fixture
def make_tokens() -> Callable[[int, int], list[int]]:
    def make(n: int, seed: int = 0) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(150_000) for _ in range(n)]

    return make


async def _until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


@pytest.fixture
def until() -> Callable[..., object]:
    return _until
