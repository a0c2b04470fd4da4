"""Fixtures of the security tests: the canary, emulated pods that record what reached them,
and the attack bodies.

Heavy parts (pods, routers, Envoy) are started once per module by module-scoped fixtures in
each test module; every test then asks for `canary`, which fails it (at the test's own
`assert_untouched()` and again at teardown) if anything reached the canary.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from router.emulator.server import EmulatorPod
from router.emulator.settings import EmulatorSettings
from tests.security.canary import Canary

MODEL = "m"
#: Fast emulated pods: 50× speed, a small cache, the router's bundled tokenizer.
POD = EmulatorSettings(port=0, speedup=50.0, num_gpu_blocks=4096, model=MODEL, seed=1)
#: Paths of a pod's own surface (metrics, admin, faults, tokenizer, cache control, KV side
#: channel) and inference paths under other spellings: none may reach a pod from a client.
FORBIDDEN = [
    ("GET", "/metrics"),
    ("POST", "/admin/faults"),
    ("GET", "/admin/faults"),
    ("GET", "/admin/timings"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/tokenize"),
    ("GET", "/version"),
    ("GET", "/health"),
    ("POST", "/kv/pull"),
    ("POST", "/v1/completions/render"),
    ("POST", "/completions"),
    ("PUT", "/v1/chat/completions"),
    ("GET", "/v1/completions"),
    ("DELETE", "/v1/models"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def canary_server() -> AsyncIterator[Canary]:
    canary = await Canary().start()
    yield canary
    await canary.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def canary(canary_server: Canary) -> AsyncIterator[Canary]:
    canary_server.hits.clear()
    yield canary_server
    await canary_server.assert_untouched()


def record_bodies(
    pod: EmulatorPod, seen: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Every request body that reached the pod's engine (a copy, in arrival order), appended
    to `seen` (shared by several pods for one arrival order) or a new list."""
    seen = [] if seen is None else seen
    prepare = pod.runtime.prepare

    def recording(req: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(copy.deepcopy(req.body))
        return prepare(req, *args, **kwargs)

    pod.runtime.prepare = recording  # type: ignore[method-assign]
    return seen


def attack_chat(canary: Canary, content: str = "hello there", **extra: Any) -> dict[str, Any]:
    """A chat body carrying the SSRF in both places vLLM reads request arguments from."""
    params = canary.ssrf_params()
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "kv_transfer_params": params,
        "vllm_xargs": {"kv_transfer_params": json.dumps(params), "keep_me": 7},
        **extra,
    }


def attack_completion(canary: Canary, prompt: str = "once upon a time", **extra: Any) -> dict:
    body = attack_chat(canary, **extra)
    del body["messages"]
    return {**body, "prompt": prompt}


def assert_clean(body: dict[str, Any]) -> None:
    """What a pod may receive from a client: no router-only field anywhere vLLM reads one."""
    assert "kv_transfer_params" not in body, body.get("kv_transfer_params")
    assert body.get("vllm_xargs") == {"keep_me": 7}, body.get("vllm_xargs")
