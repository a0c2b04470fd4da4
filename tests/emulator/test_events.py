"""KV events of an emulated pod: vLLM's frames, decodable by our decoder, keyed like the router."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import zmq
import zmq.asyncio

from router.blocks import token_block_keys
from router.emulator.server import EmulatorPod
from router.events.decode import decode_batch
from router.events.ingest import KVEventIngester
from router.events.publisher import END_OF_REPLAY
from router.events.types import BlockRemoved, BlockStored
from router.index import BlockIndex
from tests.emulator.conftest import MODEL


async def _subscribe(endpoint: str) -> tuple[zmq.asyncio.Context, zmq.asyncio.Socket]:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    await asyncio.sleep(0.2)  # ZMQ subscriptions propagate asynchronously
    return ctx, sub


async def _frames(sub: zmq.asyncio.Socket, until_blocks: int) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    stored = 0
    async with asyncio.timeout(5):
        while stored < until_blocks:
            frames = await sub.recv_multipart()
            out.append(frames)
            for ev in decode_batch(frames[2]).events:
                if isinstance(ev, BlockStored):
                    stored += len(ev.block_hashes)
    return out


async def test_events_are_vllm_frames_keyed_like_the_router(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(events_bind="tcp://127.0.0.1:0")
    ctx, sub = await _subscribe(pod.kv_events_endpoint)
    prompt = list(range(1000, 1000 + 70))  # 4 full blocks + 6 tokens
    try:
        async with httpx.AsyncClient(base_url=pod.url) as c:
            r = await c.post(
                "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}
            )
            assert r.status_code == 200
        frames = await _frames(sub, 4)
    finally:
        sub.close()
        ctx.term()
    topic, seq, payload = frames[0]
    assert topic == b""  # vLLM's default topic
    batch = msgspec.msgpack.decode(payload)  # vLLM 0.32: [ts, [map events], dp_rank]
    assert len(batch) == 3 and batch[2] == 0
    first = batch[1][0]
    assert list(first) == [
        "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
        "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
    ]  # fmt: skip
    assert first["medium"] == "GPU" and first["group_idx"] == 0
    assert first["kv_cache_spec_kind"] == "full_attention"
    assert first["extra_keys"] == [None] * len(first["block_hashes"])
    assert [int.from_bytes(f[1], "big") for f in frames] == list(range(len(frames)))
    assert len(seq) == 8
    stored = [ev for f in frames for ev in decode_batch(f[2]).events if isinstance(ev, BlockStored)]
    hashes = [h for ev in stored for h in ev.block_hashes]
    assert hashes == token_block_keys(prompt, 16)
    assert stored[0].parent_block_hash is None and stored[0].block_size == 16
    assert [t for ev in stored for t in ev.token_ids] == prompt[:64]
    assert decode_batch(payload).ts > 1e9  # wall-clock seconds, like vLLM
    # The router's ingester turns them into the keys it computes for the same tokens.
    index = BlockIndex()
    ingester = KVEventIngester(index)
    for f in frames:
        ingester.apply_payload(pod.endpoint, int.from_bytes(f[1], "big"), f[2])
    keys = token_block_keys(prompt, 16)
    assert index.longest_prefix(keys) == {pod.endpoint: 4}


async def test_eviction_emits_block_removed(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(events_bind="tcp://127.0.0.1:0", num_gpu_blocks=8)
    ctx, sub = await _subscribe(pod.kv_events_endpoint)
    removed: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=pod.url) as c:
            for base in (0, 5000):  # two 6-block prompts through an 8-block cache
                body = {"model": MODEL, "prompt": list(range(base, base + 96)), "max_tokens": 1}
                assert (await c.post("/v1/completions", json=body)).status_code == 200
        async with asyncio.timeout(5):
            while not removed:
                frames = await sub.recv_multipart()
                for ev in decode_batch(frames[2]).events:
                    if isinstance(ev, BlockRemoved):
                        removed += ev.block_hashes
    finally:
        sub.close()
        ctx.term()
    assert set(removed) <= set(token_block_keys(list(range(96)), 16))


async def test_replay_socket_resends_buffered_batches(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(events_bind="tcp://127.0.0.1:0", events_wire_form="map")
    async with httpx.AsyncClient(base_url=pod.url) as c:
        body = {"model": MODEL, "prompt": list(range(40)), "max_tokens": 1}
        assert (await c.post("/v1/completions", json=body)).status_code == 200
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(pod.kv_replay_endpoint)
    try:
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replies = []
        async with asyncio.timeout(5):
            while True:
                _, _topic, seq, payload = await dealer.recv_multipart()  # vLLM 0.32's form
                if seq == END_OF_REPLAY:
                    break
                replies.append((int.from_bytes(seq, "big"), payload))
    finally:
        dealer.close()
        ctx.term()
    assert replies and replies[0][0] == 0
    stored = [e for _, p in replies for e in decode_batch(p).events if isinstance(e, BlockStored)]
    assert [h for e in stored for h in e.block_hashes] == token_block_keys(list(range(40)), 16)


async def test_events_connect_mode_reaches_a_bound_subscriber(start_pod) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind("tcp://127.0.0.1:0")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        pod: EmulatorPod = await start_pod(
            events_connect=endpoint, events_topic="kv@{endpoint}@{model}"
        )
        # The pod holds its batches until the subscription has reached it: the very first
        # request's batch arrives, with seq 0.
        async with httpx.AsyncClient(base_url=pod.url) as c, asyncio.timeout(5):
            body = {"model": MODEL, "prompt": list(range(32)), "max_tokens": 1}
            assert (await c.post("/v1/completions", json=body)).status_code == 200
            topic, seq, _ = await sub.recv_multipart()
        assert topic == f"kv@{pod.endpoint}@{MODEL}".encode()
        assert int.from_bytes(seq, "big") == 0
    finally:
        sub.close()
        ctx.term()


async def test_text_prompt_keys_match_a_token_mode_router_with_the_same_tokenizer(
    start_pod, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from router.blocks import BlockConfig, BlockKeyer
    from router.request import parse_request
    from tests.events.test_vllm_router_interop import build_tokenizer

    build_tokenizer(tmp_path)
    tok = str(tmp_path / "tokenizer.json")
    pod: EmulatorPod = await start_pod(events_bind="tcp://127.0.0.1:0", tokenizer=tok)
    ctx, sub = await _subscribe(pod.kv_events_endpoint)
    text = " ".join(f"w{i * 7 % 3999 + 1}" for i in range(50))  # 50 tokens: 3 full blocks
    body = {"model": MODEL, "prompt": text, "max_tokens": 1}
    try:
        async with httpx.AsyncClient(base_url=pod.url) as c:
            assert (await c.post("/v1/completions", json=body)).status_code == 200
        frames = await _frames(sub, 3)
    finally:
        sub.close()
        ctx.term()
    hashes = [
        h
        for f in frames
        for ev in decode_batch(f[2]).events
        if isinstance(ev, BlockStored)
        for h in ev.block_hashes
    ]
    keyer = BlockKeyer.from_config(BlockConfig(mode="tokens", tokenizer_path=tok))
    router_keys = keyer.keys(parse_request(body, "/v1/completions"))
    assert len(router_keys) == 3 and hashes == router_keys
