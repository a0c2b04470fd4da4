"""A real vLLM engine killed mid-stream, then restarted empty at the same address.

Runs last among the real-vLLM tests (file order: keep its name last): it kills and restarts
pod 0 of the fleet. What it pins: the client of the killed stream gets an SSE error event; the
next request goes to the other pod; the dead pod's blocks leave the precise index when it
turns unhealthy, so after the restart (same port, empty cache) a prompt only it had held is
not claimed as a hit there (llm-d's router keeps such stale blocks); new events rebuild it.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.real_vllm.conftest import READY_TIMEOUT_S, _report, decision, unique_text, wait_for
from tests.real_vllm.test_precise_routing import DEBUG, router_keys
from tests.real_vllm.vllm_pods import MODEL_NAME, VllmFleet


async def test_engine_killed_mid_stream_then_restarted_does_not_keep_stale_blocks(
    real_proxy, vllm_fleet: VllmFleet
) -> None:
    victim, other = vllm_fleet.pods
    async with real_proxy() as (app, client):
        index = app.feeds.precise_index
        only_victim = {"model": MODEL_NAME, "prompt": unique_text(80), "max_tokens": 1}
        streamed = {"model": MODEL_NAME, "prompt": unique_text(80), "max_tokens": 1}
        async with httpx.AsyncClient(timeout=120) as direct:
            for body in (only_victim, streamed):
                r = await direct.post(f"{victim.url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
        keys_only = router_keys(app, "/v1/completions", only_victim)
        keys_streamed = router_keys(app, "/v1/completions", streamed)
        for keys in (keys_only, keys_streamed):
            await wait_for(
                lambda k=keys: index.longest_prefix(k).get(victim.endpoint, 0) == len(k),
                what="the victim's blocks",
            )

        # A long stream, routed to the victim by its precise hit; the engine dies mid-way.
        long = {**streamed, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        events: list[str] = []
        async with client.stream("POST", "/v1/completions", json=long, headers=DEBUG) as resp:
            assert resp.status_code == 200
            assert decision(resp)["pick"] == victim.endpoint
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 3:
                        victim.kill()
        # The stream does not end as a completed one: an SSE error event says why.
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        errors = [c for c in chunks if "error" in c]
        assert len(errors) == 1 and chunks[-1] is errors[0]
        finished = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
        assert not finished

        # Down: out of routing, and its blocks out of the index.
        pod = app.registry[victim.endpoint]
        await wait_for(lambda: not pod.healthy, 30, "the victim marked unhealthy")
        await wait_for(lambda: index.pod_block_count(victim.endpoint) == 0, 10, "blocks cleared")
        assert app.feeds.subscriber.stats.pods_cleared >= 1
        r = await client.post("/v1/completions", json={**streamed, "max_tokens": 2}, headers=DEBUG)
        assert r.status_code == 200, r.text
        assert decision(r)["pick"] == other.endpoint

        # Back at the same address with an empty cache.
        t0 = time.monotonic()
        took = await asyncio.to_thread(_restart, victim)
        _report(f"pod restart: healthy in {took:.0f} s")
        await wait_for(lambda: pod.healthy, 60, "the victim routable again")
        await wait_for(lambda: pod.metrics.taken_at is not None and not pod.metrics.stale, 30)
        assert time.monotonic() - t0 >= took
        r = await client.post("/v1/completions", json=only_victim, headers=DEBUG)
        assert r.status_code == 200, r.text
        hits = {s["pod"]: s["hit"] for s in decision(r)["top"]}
        assert hits.get(victim.endpoint, 0.0) == 0.0  # no stale claim on the empty engine

        # New events (the restarted engine counts from seq 0) rebuild its entries.
        async with httpx.AsyncClient(timeout=120) as direct:
            r = await direct.post(f"{victim.url}/v1/completions", json=only_victim)
            assert r.status_code == 200
        await wait_for(
            lambda: index.longest_prefix(keys_only).get(victim.endpoint, 0) == len(keys_only),
            30,
            "blocks from the restarted engine",
        )


def _restart(pod) -> float:  # type: ignore[no-untyped-def]
    pod.start()
    return pod.wait_ready(READY_TIMEOUT_S)
