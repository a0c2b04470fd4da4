"""Precise prefix routing through `kvroute proxy` on two real vLLM 0.32 pods.

What is checked against the engine itself: the wire form of its KV-event batches and replay
answers, that kvroute's block keys for a chat and a completion equal the keys of the engine's
own `BlockStored` token ids (chat template, BOS, block size 32), that a second turn goes to the
pod holding the first with a precise hit the engine's `prefix_cache_hits` counter confirms,
and that the engine's `/metrics` reach `/debug/pods`.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from router.blocks import token_block_keys
from router.events.decode import decode_batch
from router.events.types import BlockStored
from router.request import parse_request
from tests.real_vllm.conftest import decision, engine_counter, replay_raw, unique_text, wait_for
from tests.real_vllm.vllm_pods import BLOCK_SIZE, MODEL_NAME, VllmFleet

DEBUG = {"x-kvroute-debug": "1"}
END = (-1).to_bytes(8, "big", signed=True)


def router_keys(app: Any, path: str, body: dict[str, Any]) -> list[int]:
    req = parse_request(body, path, chat_template=app.chat_template)
    return app.scheduler.keyer.keys(req)


def pod_of(fleet: VllmFleet, endpoint: str):  # type: ignore[no-untyped-def]
    return next(p for p in fleet.pods if p.endpoint == endpoint)


async def test_real_batches_and_replay_answers_have_the_shapes_kvroute_decodes(
    vllm_fleet: VllmFleet,
) -> None:
    pod = vllm_fleet.pods[0]
    body = {"model": MODEL_NAME, "prompt": unique_text(60), "max_tokens": 1}
    body["return_token_ids"] = True
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.post(f"{pod.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    prompt_ids = r.json()["choices"][0]["prompt_token_ids"]
    assert len(prompt_ids) >= 2 * BLOCK_SIZE
    frames = replay_raw(pod, 0)
    # vLLM 0.32: [b"", topic, seq, payload] per batch, then [b"", b"", END, b""].
    assert frames[-1] == [b"", b"", END, b""]
    assert all(len(f) == 4 and f[0] == b"" and f[1] == pod.topic.encode() for f in frames[:-1])
    mine = None
    for f in reversed(frames[:-1]):
        raw = msgspec.msgpack.decode(f[3])
        stored = [e for e in raw[1] if e.get("type") == "BlockStored"]
        if stored and stored[0]["token_ids"] == prompt_ids[: len(stored[0]["token_ids"])]:
            mine = (raw, f[3])
            break
    assert mine is not None, "the prompt's BlockStored batch is not in the replay buffer"
    raw, payload = mine
    # The batch is [ts, [events], data_parallel_rank]; events are maps with the 0.32 fields.
    assert len(raw) == 3 and isinstance(raw[0], float) and raw[2] == 0
    ev = raw[1][0]
    assert ev["group_idx"] == 0 and ev["kv_cache_spec_kind"] == "full_attention"
    assert ev["extra_keys"] == [None] * len(ev["block_hashes"])
    assert ev["medium"] == "GPU" and ev["lora_name"] is None and ev["block_size"] == BLOCK_SIZE
    batch = decode_batch(payload)
    assert batch.data_parallel_rank == 0 and not batch.unknown_tags
    got = batch.events[0]
    assert isinstance(got, BlockStored)
    assert (got.group_idx, got.kv_cache_spec_kind) == (0, "full_attention")
    assert got.block_hashes == ev["block_hashes"]


async def test_chat_second_turn_goes_to_the_prefix_holder_with_a_precise_hit(
    real_proxy, vllm_fleet: VllmFleet
) -> None:
    async with real_proxy() as (app, client):
        messages = [
            {"role": "system", "content": "You are terse. " + unique_text(20)},
            {"role": "user", "content": unique_text(120)},
        ]
        body: dict[str, Any] = {"model": MODEL_NAME, "messages": messages, "max_tokens": 8}
        body["return_token_ids"] = True
        r1 = await client.post("/v1/chat/completions", json=body, headers=DEBUG)
        assert r1.status_code == 200, r1.text
        first = decision(r1)
        holder = first["pick"]
        answer = r1.json()["choices"][0]["message"]["content"]
        engine_ids = r1.json()["prompt_token_ids"]
        keys1 = router_keys(app, "/v1/chat/completions", body)
        # The router's keys are the engine's: same tokens (template, BOS), same block size.
        n_full = len(engine_ids) // BLOCK_SIZE
        assert keys1[:n_full] == token_block_keys(engine_ids, BLOCK_SIZE, app.config.blocks.seed)
        index = app.feeds.precise_index
        await wait_for(
            lambda: index.longest_prefix(keys1).get(holder, 0) >= n_full, what="turn 1's blocks"
        )
        assert index.longest_prefix(keys1) == {holder: float(n_full)}

        turn2 = {
            **body,
            "messages": [
                *messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": unique_text(30)},
            ],
        }
        pod = pod_of(vllm_fleet, holder)
        hits_before = await engine_counter(pod, "prefix_cache_hits")
        r2 = await client.post("/v1/chat/completions", json=turn2, headers=DEBUG)
        assert r2.status_code == 200, r2.text
        second = decision(r2)
        assert second["pick"] == holder
        top = {s["pod"]: s["hit"] for s in second["top"]}
        keys2 = router_keys(app, "/v1/chat/completions", turn2)
        # What the engine holds: the full blocks of turn 1's prompt and of the answer it
        # generated (all but the last sampled token have their KV computed). Turn 2 shares
        # them up to where its re-tokenized answer differs; BPE may merge across the
        # boundary, so the last block of turn 1's prompt can differ (for the engine too).
        out_ids = r1.json()["choices"][0]["token_ids"]
        held = token_block_keys([*engine_ids, *out_ids[:-1]], BLOCK_SIZE, app.config.blocks.seed)
        shared = next(
            (i for i, (a, b) in enumerate(zip(held, keys2, strict=False)) if a != b),
            min(len(held), len(keys2)),
        )
        assert shared >= n_full - 1
        assert abs(top[holder] - round(shared / len(keys2), 4)) < 1e-3
        assert all(hit == 0 for p, hit in top.items() if p != holder)
        hits_after = await engine_counter(pod, "prefix_cache_hits")
        # The engine served from its cache at least the blocks the router predicted.
        assert hits_after - hits_before >= shared * BLOCK_SIZE


async def test_completion_keys_equal_the_engines_block_keys(real_proxy) -> None:
    async with real_proxy() as (app, client):
        body = {"model": MODEL_NAME, "prompt": unique_text(100), "max_tokens": 1}
        body["return_token_ids"] = True
        r = await client.post("/v1/completions", json=body, headers=DEBUG)
        assert r.status_code == 200, r.text
        pick = decision(r)["pick"]
        engine_ids = r.json()["choices"][0]["prompt_token_ids"]
        n_full = len(engine_ids) // BLOCK_SIZE
        keys = router_keys(app, "/v1/completions", body)
        assert engine_ids[0] == 0  # BOS, as the router's tokenizer adds it
        assert keys[:n_full] == token_block_keys(engine_ids, BLOCK_SIZE, app.config.blocks.seed)
        index = app.feeds.precise_index
        await wait_for(lambda: index.longest_prefix(keys).get(pick, 0) >= n_full, what="blocks")
        r2 = await client.post("/v1/completions", json=body, headers=DEBUG)
        assert decision(r2)["pick"] == pick
        assert {s["pod"]: s["hit"] for s in decision(r2)["top"]}[pick] == 1.0


async def test_engine_metrics_and_event_feed_are_shown_in_debug_pods(
    real_proxy, vllm_fleet: VllmFleet
) -> None:
    async with real_proxy() as (app, client):
        await wait_for(
            lambda: all(p.metrics.taken_at is not None for p in app.registry), what="scrapes"
        )
        report = (await client.get("/debug/pods")).json()["pods"]
        assert {p["endpoint"] for p in report} == {p.endpoint for p in vllm_fleet.pods}
        for p in report:
            m = p["metrics"]
            assert m["waiting"] == 0 and m["running"] == 0
            assert 0.0 <= m["kv_utilization"] <= 1.0
            assert m["age_s"] is not None and m["age_s"] < 5 and not m["stale"]
            assert m["process_start_time"] > 1.6e9
            assert m["prefix_cache_queries"] >= m["prefix_cache_hits"] >= 0
            feed = p["kv_events"]
            assert feed["mode"] == "bind" and feed["connected"] is None
            assert feed["last_seq"] is not None and feed["batches"] >= 1
            assert feed["last_event_age_s"] is not None and not feed["silent"]
        page = (await client.get("/metrics")).text
        assert "kvroute_kv_events_last_event_age_seconds{pod=" in page
        assert "kvroute_kv_events_feed_silent{pod=" in page
