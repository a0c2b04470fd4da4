"""`usage.prompt_tokens_details` as vLLM reports it: null by default; with
`--enable-prompt-tokens-details`, `{cached_tokens}` once the engine found part of the prompt
cached (still null on a cold prompt), in JSON answers and in the stream's usage chunk."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from tests.emulator.conftest import MODEL

PROMPT = " ".join(f"token{i % 50}" for i in range(300))


async def _usage(pod: Any, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=pod.url, timeout=10) as c:
        r = await c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["usage"]
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
    return json.loads(events[-1])["usage"]


async def test_the_details_are_null_by_default_as_in_vllm(start_pod: Callable[..., Any]) -> None:
    pod = await start_pod()
    for _ in range(2):  # the second prompt hits the cache: still no details
        usage = await _usage(pod, stream=False)
        assert usage["prompt_tokens_details"] is None
    assert "prompt_tokens_details" not in await _usage(pod, stream=True)


async def test_enabled_details_report_the_cached_prefix(start_pod: Callable[..., Any]) -> None:
    pod = await start_pod(enable_prompt_tokens_details=True)
    cold = await _usage(pod, stream=False)
    assert cold["prompt_tokens_details"] is None  # nothing cached: vLLM leaves them out
    warm = await _usage(pod, stream=False)
    cached = warm["prompt_tokens_details"]["cached_tokens"]
    block = pod.runtime.engine_config.block_size
    # Whole blocks of the prompt, short of the last token (which is always computed).
    assert 0 < cached < warm["prompt_tokens"] and cached % block == 0
    streamed = await _usage(pod, stream=True)
    assert streamed["prompt_tokens_details"] == {"cached_tokens": cached}
