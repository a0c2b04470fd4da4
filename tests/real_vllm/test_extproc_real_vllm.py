"""The ext_proc face on two real vLLM 0.32 pods through a real Envoy.

One picker (`kvroute serve`'s `PickerServer`, in process, on the fleet's config) and one Envoy
(the shipped full-duplex bootstrap: ORIGINAL_DST keyed by `x-gateway-destination-endpoint`)
serve every test of this module. What is checked against the engines: a chat's second turn
goes through Envoy to the pod whose own KV events hold its first turn, on a precise hit the
engine's `prefix_cache_hits` counter confirms; an engine killed mid-stream breaks the
client's stream (Envoy resets it), the next request goes to the other pod, and the killed pod
is restarted at the same address before the module ends (the pods are the package's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio

from envoy_extproc.envoy_process import EnvoyProcess
from envoy_extproc.server import PickerServer
from envoy_extproc.settings import ExtProcSettings
from router.config import load_config
from router.scheduler import Decision
from tests.real_vllm.conftest import (
    EVENTS,
    PLUGINS,
    READY_TIMEOUT_S,
    _report,
    engine_counter,
    join_feeds,
    unique_text,
    wait_for,
)
from tests.real_vllm.vllm_pods import BLOCK_SIZE, MAX_MODEL_LEN, MODEL_NAME, VllmFleet, VllmPod

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Stack:
    picker: PickerServer
    envoy: EnvoyProcess
    client: httpx.AsyncClient
    decisions: list[Decision] = field(default_factory=list)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    vllm_fleet: VllmFleet, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    path = tmp_path_factory.mktemp("extproc-real") / "router.yaml"
    path.write_text(vllm_fleet.router_config(PLUGINS, EVENTS))
    settings = ExtProcSettings(
        host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, grace_period_s=5
    )
    async with contextlib.AsyncExitStack() as exits:
        picker = PickerServer(load_config(path), settings, config_path=path)
        await picker.start()
        exits.push_async_callback(picker.stop, 0)
        assert picker.ports is not None and picker.feeds.precise_index is not None
        await join_feeds(picker, vllm_fleet)
        envoy = await exits.enter_async_context(
            EnvoyProcess("FULL_DUPLEX_STREAMED", picker.ports.grpc)
        )
        client = await exits.enter_async_context(httpx.AsyncClient(base_url=envoy.url, timeout=120))
        result = Stack(picker, envoy, client)
        on_pick = picker.scheduler.on_pick

        def record(decision: Decision, now: float | None = None) -> None:
            result.decisions.append(decision)
            on_pick(decision, now)

        picker.scheduler.on_pick = record  # type: ignore[method-assign]
        yield result


def _hits(decision: Decision) -> dict[str, float]:
    return {p["endpoint"]: p["prefix_hit"] for p in decision.explain()["pods"]}


def _pod(fleet: VllmFleet, endpoint: str) -> VllmPod:
    return next(p for p in fleet.pods if p.endpoint == endpoint)


async def test_second_turn_through_envoy_lands_on_the_prefix_holder_with_a_precise_hit(
    stack: Stack, vllm_fleet: VllmFleet
) -> None:
    messages = [
        {"role": "system", "content": "You are terse. " + unique_text(15)},
        {"role": "user", "content": unique_text(110)},
    ]
    body: dict[str, Any] = {"model": MODEL_NAME, "messages": messages, "max_tokens": 6}
    r1 = await stack.client.post("/v1/chat/completions", json=body)
    assert r1.status_code == 200, r1.text
    first = stack.decisions[-1]
    holder = first.target
    keys1 = first.request.block_keys
    assert keys1 and len(keys1) >= 8
    index = stack.picker.feeds.precise_index
    # The pod Envoy sent it to is the one whose own events now report its blocks.
    await wait_for(
        lambda: (
            len(index.holders(keys1[len(keys1) - 2])) == 1
            and index.holders(keys1[len(keys1) - 2])[0][0] == holder
        ),
        30,
        "turn 1's blocks in the holder's events",
    )
    turn2 = {
        **body,
        "messages": [
            *messages,
            {"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": unique_text(25)},
        ],
    }
    pod = _pod(vllm_fleet, holder)
    hits_before = await engine_counter(pod, "prefix_cache_hits")
    r2 = await stack.client.post("/v1/chat/completions", json=turn2)
    assert r2.status_code == 200, r2.text
    second = stack.decisions[-1]
    assert second.target == holder
    hits = _hits(second)
    assert hits[holder] > 0.5 and all(h == 0.0 for p, h in hits.items() if p != holder)
    keys2 = second.request.block_keys or []
    shared = next(
        (i for i, (a, b) in enumerate(zip(keys1, keys2, strict=False)) if a != b),
        min(len(keys1), len(keys2)),
    )
    # The engine behind Envoy served from its cache at least the blocks the picker predicted.
    assert await engine_counter(pod, "prefix_cache_hits") - hits_before >= shared * BLOCK_SIZE


async def test_engine_killed_mid_stream_client_sees_an_error_next_request_goes_elsewhere(
    stack: Stack, vllm_fleet: VllmFleet
) -> None:
    victim, other = vllm_fleet.pods
    prompt = {"model": MODEL_NAME, "prompt": unique_text(80), "max_tokens": 1}
    async with httpx.AsyncClient(timeout=120) as direct:
        r = await direct.post(f"{victim.url}/v1/completions", json=prompt)
        assert r.status_code == 200, r.text
    index = stack.picker.feeds.precise_index
    await wait_for(lambda: index.pod_block_count(victim.endpoint) > 0, 30, "the victim's blocks")
    # As long an answer as the context allows, and the engine killed at the first event: a
    # tiny model on a CPU writes tokens faster than a loaded client reads them through Envoy,
    # and a kill that lands after the engine's last token tests nothing.
    long = {**prompt, "max_tokens": MAX_MODEL_LEN - 400, "ignore_eos": True, "stream": True}
    events: list[str] = []
    error: Exception | None = None
    try:
        async with stack.client.stream("POST", "/v1/completions", json=long) as resp:
            assert resp.status_code == 200
            assert stack.decisions[-1].target == victim.endpoint  # its precise hit
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 1:
                        victim.kill()
    except httpx.HTTPError as exc:  # Envoy resets the downstream stream
        error = exc
    try:
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        finished = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
        # The client can tell: the stream broke, or it ended without a finish and [DONE].
        assert error is not None or (not finished and "[DONE]" not in events), events[-3:]
        assert events  # the stream had started: the engine died mid-stream, not before it

        pod = stack.picker.registry[victim.endpoint]
        await wait_for(lambda: not pod.healthy, 30, "the victim marked unhealthy")
        served_before = await engine_counter(other, "prompt_tokens")
        r = await stack.client.post("/v1/completions", json={**prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert stack.decisions[-1].target == other.endpoint
        assert await engine_counter(other, "prompt_tokens") > served_before
    finally:
        if victim.pgid is None:  # killed: back at the same address for the package's tests
            took = await asyncio.to_thread(_restart, victim)
            _report(f"ext_proc kill test: pod restarted, healthy in {took:.0f} s")
    await wait_for(lambda: stack.picker.registry[victim.endpoint].healthy, 60, "victim back")


def _restart(pod: VllmPod) -> float:
    pod.start()
    return pod.wait_ready(READY_TIMEOUT_S)
