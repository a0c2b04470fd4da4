"""The Envoy ext_proc endpoint picker under attack, through a real Envoy in all three body
modes: SSRF through the body (router-only fields), unrouted paths of any method, with or
without a body.

Per body mode, one stack for the module: a real emulated vLLM pod (recording what reached its
engine), the picker (`PickerServer`) and Envoy with the shipped bootstrap of that mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from envoy_extproc.envoy_process import EnvoyProcess
from envoy_extproc.server import PickerServer
from envoy_extproc.settings import ExtProcSettings
from router.config import load_config
from router.emulator.server import EmulatorPod
from tests.security.canary import Canary
from tests.security.conftest import (
    FORBIDDEN,
    MODEL,
    POD,
    assert_clean,
    attack_chat,
    attack_completion,
    record_bodies,
)
from tests.test_deploy_crs import requires_envoy

MODES = ("FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED")
pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    requires_envoy,  # skips without Envoy, except under CI (where a missing Envoy fails)
]


@dataclass
class Stack:
    mode: str
    pod: EmulatorPod
    bodies: list[dict[str, Any]]
    picker: PickerServer
    envoy: EnvoyProcess
    client: httpx.AsyncClient


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=MODES)
async def stack(request: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    mode = request.param
    async with contextlib.AsyncExitStack() as es:
        pod = await es.enter_async_context(EmulatorPod(replace(POD, precise_timers=False)))
        path: Path = tmp_path_factory.mktemp(mode) / "router.yaml"
        path.write_text(f"pods:\n  - {{endpoint: '{pod.endpoint}', models: [{MODEL}]}}\nseed: 1\n")
        settings = ExtProcSettings(
            host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, grace_period_s=1
        )
        picker = PickerServer(load_config(path), settings, config_path=path)
        await picker.start()
        es.push_async_callback(picker.stop, 0)
        assert picker.ports is not None
        envoy = await es.enter_async_context(EnvoyProcess(mode, picker.ports.grpc))
        client = await es.enter_async_context(httpx.AsyncClient(base_url=envoy.url, timeout=20))
        yield Stack(mode, pod, record_bodies(pod), picker, envoy, client)


def _stripped(stack: Stack) -> float:
    value = stack.picker.metrics.registry.get_sample_value(
        "kvroute_stripped_fields_total", {"field": "kv_transfer_params"}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("path", "size", "stream"),
    [
        ("/v1/chat/completions", 1, False),
        ("/v1/chat/completions", 1, True),
        ("/v1/completions", 1, False),
        # ~165 KB: many body chunks through Envoy (STREAMED replaces the first, clears the rest)
        ("/v1/chat/completions", 15_000, False),
    ],
)
async def test_extproc_strips_router_fields_in_every_body_mode(
    stack: Stack, canary: Canary, path: str, size: int, stream: bool
) -> None:
    make = attack_chat if path == "/v1/chat/completions" else attack_completion
    body = make(canary, "many words " * size, stream=stream)
    before, stripped = len(stack.bodies), _stripped(stack)
    r = await stack.client.post(path, json=body)
    assert r.status_code == 200, (stack.mode, r.status_code, r.text[:300])
    [got] = stack.bodies[before:]
    assert_clean(got)
    expected = {k: v for k, v in body.items() if k not in ("kv_transfer_params", "vllm_xargs")}
    assert {k: v for k, v in got.items() if k != "vllm_xargs"} == expected
    assert _stripped(stack) == stripped + 1
    await canary.assert_untouched()


async def test_extproc_leaves_clean_bodies_byte_for_byte(stack: Stack, canary: Canary) -> None:
    body = {"model": MODEL, "prompt": "plain request", "max_tokens": 2, "vllm_xargs": {"a": 1}}
    before, stripped = len(stack.bodies), _stripped(stack)
    r = await stack.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert stack.bodies[before:] == [body]
    assert _stripped(stack) == stripped
    await canary.assert_untouched()


async def test_extproc_answers_models_and_refuses_every_other_path(
    stack: Stack, canary: Canary
) -> None:
    before = len(stack.bodies)
    for method, path in FORBIDDEN:
        for content in (None, json.dumps({"error_rate": 1.0, "model": MODEL})):
            r = await stack.client.request(method, path, content=content)
            assert r.status_code in (404, 405), (stack.mode, method, path, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] in ("unknown_path", "method_not_allowed"), (method, path, err)
            # The picker's own answer (it names the served paths), not Envoy's or a pod's.
            assert "/v1/chat/completions" in err["message"] or r.status_code == 405, err
    models = await stack.client.get("/v1/models")
    assert models.status_code == 200
    assert models.json()["data"] == [{"id": MODEL, "object": "model", "owned_by": "kvroute"}]
    assert stack.bodies[before:] == []
    assert stack.pod.runtime.faults.settings.error_rate == 0.0
    await canary.assert_untouched()


async def _raw_get(stack: Stack, path: str) -> tuple[int, bytes]:
    """A request with the path exactly as written (clients normalise dot segments)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.envoy.listen_port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "path",
    ["/v1/completions/../../metrics", "/v1//chat/completions/../../../admin/faults", "//metrics"],
)
async def test_extproc_refuses_dot_segment_and_slash_tricks(
    stack: Stack, canary: Canary, path: str
) -> None:
    status, body = await _raw_get(stack, path)
    assert status == 404, (path, status, body[:200])
    assert b"vllm:" not in body and json.loads(body)["error"]["code"] == "unknown_path"
    await canary.assert_untouched()
