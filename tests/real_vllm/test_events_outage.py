"""An events-only outage on a real vLLM 0.32 pod: made visible, then repaired by replay.

The outage: kvroute's bind-mode SUB socket stops subscribing to one pod's topic, so that pod's
PUB drops its batches while the pod keeps serving (the pod stays healthy) — what a broken
network path or a stuck PUB looks like from the router. The engine keeps the batches in its
replay buffer; when the feed comes back, the sequence gap must be filled from vLLM's replay
socket (whose 0.32 answer form kvroute did not accept before), with no rebuild.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import zmq

from tests.real_vllm.conftest import unique_text, wait_for
from tests.real_vllm.test_precise_routing import router_keys
from tests.real_vllm.vllm_pods import MODEL_NAME, VllmFleet


async def test_events_outage_is_visible_and_replay_fills_the_gap(
    real_proxy, vllm_fleet: VllmFleet, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="router.feeds")
    cut, other = vllm_fleet.pods
    async with real_proxy() as (app, client):
        sub = app.feeds.subscriber
        assert sub is not None and sub._bound is not None
        stats = sub.stats
        before = (stats.replays, stats.replay_failures, stats.rebuilds)
        seq_before = sub.feed_state(cut.endpoint).last_seq
        # Cut only `cut`'s feed: the SUB now asks for the other pod's topic alone.
        sub._bound.setsockopt(zmq.UNSUBSCRIBE, b"kv@")
        sub._bound.setsockopt(zmq.SUBSCRIBE, other.topic.encode())
        await asyncio.sleep(1.0)  # the new filter reaches the pods' PUB sockets
        bodies = [
            {"model": MODEL_NAME, "prompt": unique_text(80), "max_tokens": 1} for _ in range(3)
        ]
        async with httpx.AsyncClient(timeout=120) as direct:
            for body in bodies:
                r = await direct.post(f"{cut.url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
            assert sub.feed_state(cut.endpoint).last_seq == seq_before  # nothing came through
            await wait_for(
                lambda: app.feeds.feed_report(cut.endpoint)["silent"], 30, "the silent mark"
            )
            report = {p["endpoint"]: p for p in (await client.get("/debug/pods")).json()["pods"]}
            assert report[cut.endpoint]["healthy"] is True
            assert report[cut.endpoint]["kv_events"]["silent"] is True
            assert report[cut.endpoint]["kv_events"]["last_event_age_s"] >= 2.0
            # The other pod's feed still flows: once a live batch of its own arrives it is not
            # silent. (Asserted after a batch, not at once: work the engine did before this
            # router subscribed can reach its counters after the router's first scrape, which
            # the silence rule cannot tell from an outage until the next batch.)
            other_batches = sub.feed_state(other.endpoint).batches
            body = {"model": MODEL_NAME, "prompt": unique_text(80), "max_tokens": 1}
            assert (await direct.post(f"{other.url}/v1/completions", json=body)).is_success
            await wait_for(
                lambda: sub.feed_state(other.endpoint).batches > other_batches, 30, "other's batch"
            )
            await wait_for(
                lambda: not app.feeds.feed_report(other.endpoint)["silent"], 10, "other not silent"
            )
            assert app.feeds.feed_report(cut.endpoint)["silent"] is True
            page = (await client.get("/metrics")).text
            assert f'kvroute_kv_events_feed_silent{{pod="{cut.endpoint}"}} 1.0' in page
            assert f'kvroute_kv_events_feed_silent{{pod="{other.endpoint}"}} 0.0' in page
            warnings = [
                r.getMessage() for r in caplog.records if "feed is silent" in r.getMessage()
            ]
            assert sum(cut.endpoint in w for w in warnings) == 1
            assert stats.silent_feeds >= 1

            # The feed comes back: the next live batch shows a gap, the replay fills it.
            sub._bound.setsockopt(zmq.UNSUBSCRIBE, other.topic.encode())
            sub._bound.setsockopt(zmq.SUBSCRIBE, b"kv@")
            await asyncio.sleep(1.0)
            state = sub.feed_state(cut.endpoint)
            for _ in range(20):
                body = {"model": MODEL_NAME, "prompt": unique_text(40), "max_tokens": 1}
                assert (await direct.post(f"{cut.url}/v1/completions", json=body)).is_success
                await asyncio.sleep(0.5)
                if state.last_seq != seq_before:
                    break
        await wait_for(lambda: stats.replays > before[0], 30, "a replay")
        await wait_for(
            lambda: sub._streams and all(s.replay is None for s in sub._streams.values()),
            30,
            "replay end",
        )
        await sub.ingester.drain()
        assert (stats.replay_failures, stats.rebuilds) == before[1:]
        assert stats.replayed_batches >= 3
        index = app.feeds.precise_index
        for body in bodies:
            keys = router_keys(app, "/v1/completions", body)
            assert index.longest_prefix(keys) == {cut.endpoint: float(len(keys))}
        await wait_for(
            lambda: not app.feeds.feed_report(cut.endpoint)["silent"], 10, "silent cleared"
        )
        assert any("feed resumed" in r.getMessage() for r in caplog.records)
