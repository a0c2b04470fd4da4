"""A silent KV-event feed on a real vLLM 0.32 pod: precise mode falls back to the router's own
picks for that pod, so a conversation's second turn still goes where its first turn went.

The outage is cut as in `test_events_outage`: kvroute's bind-mode SUB stops subscribing to one
pod's topic, the pod keeps serving and stays healthy. Without the fallback, the cut pod's new
prefixes never reach the precise index, so their follow-ups score 0.0 everywhere and land
anywhere (the bug seen with 2 real pods). When the feed comes back, replay fills the truth and
the fallback ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import zmq

from tests.real_vllm.conftest import decision, unique_text, wait_for
from tests.real_vllm.test_precise_routing import DEBUG, router_keys
from tests.real_vllm.vllm_pods import MODEL_NAME, VllmFleet


def _first_turn() -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "You are terse. " + unique_text(10)},
        {"role": "user", "content": unique_text(90)},
    ]
    return {"model": MODEL_NAME, "messages": messages, "max_tokens": 4}


def _follow_up(first: dict[str, Any], answer: str) -> dict[str, Any]:
    messages = [
        *first["messages"],
        {"role": "assistant", "content": answer},
        {"role": "user", "content": unique_text(20)},
    ]
    return {**first, "messages": messages}


async def test_follow_up_of_a_silent_pod_goes_back_to_it_on_the_routers_own_record(
    real_proxy, vllm_fleet: VllmFleet
) -> None:
    cut, other = vllm_fleet.pods
    async with real_proxy() as (app, client):
        sub, index = app.feeds.subscriber, app.feeds.precise_index
        assert sub is not None and sub._bound is not None and index is not None
        sub._bound.setsockopt(zmq.UNSUBSCRIBE, b"kv@")
        sub._bound.setsockopt(zmq.SUBSCRIBE, other.topic.encode())
        await asyncio.sleep(1.0)  # the new filter reaches the pods' PUB sockets
        async with httpx.AsyncClient(timeout=120) as direct:
            for _ in range(2):  # the cut pod computes blocks whose events never come
                body = {"model": MODEL_NAME, "prompt": unique_text(80), "max_tokens": 1}
                assert (await direct.post(f"{cut.url}/v1/completions", json=body)).is_success
        await wait_for(lambda: cut.endpoint in index.silent_pods, 30, "the cut pod marked silent")

        # First turns until at least one lands on the cut pod (ties break at random).
        turns: list[tuple[dict[str, Any], str, str]] = []
        for _ in range(12):
            first = _first_turn()
            r = await client.post("/v1/chat/completions", json=first, headers=DEBUG)
            assert r.status_code == 200, r.text
            turns.append((first, r.json()["choices"][0]["message"]["content"], decision(r)["pick"]))
            if sum(pick == cut.endpoint for *_, pick in turns) >= 2 and len(turns) >= 3:
                break
        on_cut = [t for t in turns if t[2] == cut.endpoint]
        assert on_cut, "no first turn was routed to the cut pod"
        # Past the pending entries' life (2 s after the first token): only a fallback holds.
        await asyncio.sleep(2.5)
        index.expire_pending(asyncio.get_running_loop().time() + 1e6)
        assert index.pending_count(cut.endpoint) == 0
        for first, _, _ in on_cut:  # the cut pod's feed said nothing of these first turns
            keys = router_keys(app, "/v1/chat/completions", first)
            assert index.longest_prefix(keys).get(cut.endpoint, 0.0) == 0.0
        for first, answer, pick in turns:
            follow = _follow_up(first, answer)
            r = await client.post("/v1/chat/completions", json=follow, headers=DEBUG)
            assert r.status_code == 200, r.text
            got = decision(r)
            assert got["pick"] == pick, (pick, got)
            hits = {s["pod"]: s["hit"] for s in got["top"]}
            assert hits[pick] > 0.5
        assert app.feeds.feed_report(cut.endpoint)["silent"] is True

        # The feed comes back: replay fills the precise index, the fallback ends.
        sub._bound.setsockopt(zmq.UNSUBSCRIBE, other.topic.encode())
        sub._bound.setsockopt(zmq.SUBSCRIBE, b"kv@")
        await asyncio.sleep(1.0)
        seq = sub.feed_state(cut.endpoint).last_seq
        async with httpx.AsyncClient(timeout=120) as direct:
            for _ in range(20):
                body = {"model": MODEL_NAME, "prompt": unique_text(40), "max_tokens": 1}
                assert (await direct.post(f"{cut.url}/v1/completions", json=body)).is_success
                await asyncio.sleep(0.5)
                if sub.feed_state(cut.endpoint).last_seq != seq:
                    break
        await wait_for(lambda: cut.endpoint not in index.silent_pods, 15, "the fallback ended")
        await wait_for(
            lambda: all(s.replay is None for s in sub._streams.values()), 30, "replay end"
        )
        await sub.ingester.drain()
        first, _, _ = on_cut[0]
        keys = router_keys(app, "/v1/chat/completions", first)
        # The engine's own events (replayed) now say the cut pod holds the first turn.
        assert index.longest_prefix(keys).get(cut.endpoint, 0.0) >= len(keys) - 1
