"""End to end over real ZMQ sockets on 127.0.0.1: publisher → subscriber → ingester → index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import zmq

from router.blocks import BlockConfig, token_block_keys
from router.events.decode import decode_batch
from router.events.ingest import KVEventIngester
from router.events.publisher import KVEventPublisher
from router.events.settings import EventsSettings
from router.events.subscriber import KVEventSubscriber
from router.events.types import AllBlocksCleared
from router.index import BlockIndex
from router.pods import Pod, PodRegistry

BLOCK = BlockConfig(mode="tokens", block_size=16, seed=3)
LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"


def keys(tokens: list[int]) -> list[int]:
    return token_block_keys(tokens, BLOCK.block_size, BLOCK.seed)


async def make_subscriber(mode: str, **settings) -> KVEventSubscriber:
    s = EventsSettings(mode=mode, endpoint=LOOPBACK_ANY_PORT, replay_timeout_s=1.0, **settings)
    sub = KVEventSubscriber(KVEventIngester(BlockIndex(), BLOCK, s))
    await sub.start()
    return sub


@pytest.fixture
async def bind_sub() -> AsyncIterator[KVEventSubscriber]:
    sub = await make_subscriber("bind")
    yield sub
    await sub.close()


@pytest.fixture
async def connect_sub() -> AsyncIterator[KVEventSubscriber]:
    sub = await make_subscriber("connect")
    yield sub
    await sub.close()


@pytest.fixture
def publishers() -> AsyncIterator[Callable[..., KVEventPublisher]]:
    made: list[KVEventPublisher] = []

    def make(endpoint: str, **kw) -> KVEventPublisher:
        pub = KVEventPublisher(endpoint, **kw)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.close()


async def joined(pub: KVEventPublisher, sub: KVEventSubscriber, until) -> None:
    """Publish empty batches until one arrives (ZMQ subscriptions propagate asynchronously)."""
    stats = sub.stats
    before = stats.batches

    async def probe() -> None:
        while stats.batches == before:
            pub.publish([])
            await asyncio.sleep(0.01)

    task = asyncio.create_task(probe())
    try:
        await until(lambda: stats.batches > before, what="subscription to join")
    finally:
        task.cancel()
    await asyncio.sleep(0.02)
    await sub.ingester.drain()


async def settle(sub: KVEventSubscriber, until, cond: Callable[[], bool], what: str) -> None:
    await until(lambda: cond() and sub.ingester.pending == 0, what=what)


@pytest.mark.parametrize("wire_form", ["array", "map"])
async def test_bind_mode_learns_pod_and_model_from_topic_and_indexes_blocks(
    bind_sub, publishers, until, make_tokens, stored_chain, wire_form
) -> None:
    pub = publishers(bind_sub.endpoint, topic="kv@10.0.0.7@llama", wire_form=wire_form)
    await joined(pub, bind_sub, until)
    tokens = make_tokens(16 * 8)
    for ev in stored_chain(tokens, per_event=3):
        pub.publish([ev])
    idx = bind_sub.ingester.index
    await settle(bind_sub, until, lambda: idx.pod_block_count("10.0.0.7") == 8, "8 blocks")
    assert idx.longest_prefix(keys(tokens)) == {"10.0.0.7": 8.0}
    assert bind_sub.models == {"10.0.0.7": "llama"}
    assert bind_sub.stats.gaps == 0 and bind_sub.stats.rebuilds == 0


@pytest.mark.parametrize("wire_form", ["array", "map"])
async def test_connect_mode_subscribes_to_each_pods_bound_publisher(
    connect_sub, publishers, until, make_tokens, stored_chain, wire_form
) -> None:
    pubs = {
        name: publishers(LOOPBACK_ANY_PORT, bind=True, wire_form=wire_form) for name in ("a", "b")
    }
    for name, pub in pubs.items():
        connect_sub.add_pod(name, pub.endpoint)
    for pub in pubs.values():
        await joined(pub, connect_sub, until)
    ta, tb = make_tokens(64, seed=1), make_tokens(64, seed=2)
    pubs["a"].publish(stored_chain(ta))
    pubs["b"].publish(stored_chain(tb))
    idx = connect_sub.ingester.index
    await settle(connect_sub, until, lambda: idx.entry_count() == 8, "both pods' blocks")
    assert idx.longest_prefix(keys(ta)) == {"a": 4.0}
    assert idx.longest_prefix(keys(tb)) == {"b": 4.0}


async def test_gap_is_filled_by_replay_without_a_rebuild(
    connect_sub, publishers, until, make_tokens, stored_chain
) -> None:
    pub = publishers(LOOPBACK_ANY_PORT, bind=True, replay_endpoint=LOOPBACK_ANY_PORT)
    connect_sub.add_pod("p", pub.endpoint, pub.replay_endpoint)
    await joined(pub, connect_sub, until)
    tokens = make_tokens(16 * 6)
    events = stored_chain(tokens, per_event=1)
    pub.publish([events[0]])
    pub.drop_next(3)  # lost on the wire, still in the replay buffer
    for ev in events[1:]:
        pub.publish([ev])
    idx = connect_sub.ingester.index
    await settle(connect_sub, until, lambda: idx.pod_block_count("p") == 6, "replayed blocks")
    assert idx.longest_prefix(keys(tokens)) == {"p": 6.0}
    s = connect_sub.stats
    assert (s.gaps, s.replays, s.rebuilds) == (1, 1, 0)
    assert s.replayed_batches >= 3  # the replay also carries batches sent after the gap
    assert s.orphans == 0


class OldFormReplayServer:
    """A replay ROUTER answering in the form vLLM used before 0.32 (and kvroute's publisher
    before it followed 0.32): `[id, b"", seq, payload]` per batch, `[id, b"", END, b""]`."""

    def __init__(self, batches: list[tuple[int, bytes]]) -> None:
        import threading

        self.batches = batches
        self.requests: list[int] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(LOOPBACK_ANY_PORT)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            client, _, start = self._sock.recv_multipart()
            self.requests.append(int.from_bytes(start, "big"))
            for seq, payload in self.batches:
                if seq >= self.requests[-1]:
                    self._sock.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            self._sock.send_multipart((client, b"", (-1).to_bytes(8, "big", signed=True), b""))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(0)
        self._ctx.term()


async def test_replay_in_the_old_two_frame_form_is_still_accepted(
    connect_sub, publishers, until, make_tokens, stored_chain
) -> None:
    from router.events.publisher import encode_batch

    pub = publishers(LOOPBACK_ANY_PORT, bind=True)
    tokens = make_tokens(16 * 4)
    events = stored_chain(tokens, per_event=1)
    server = OldFormReplayServer([])
    try:
        connect_sub.add_pod("p", pub.endpoint, server.endpoint)
        await joined(pub, connect_sub, until)  # seq 0 (and maybe more) arrive live
        first = pub.next_seq
        server.batches = [
            (first + 1 + i, encode_batch([ev], 1.0)) for i, ev in enumerate(events[1:3])
        ]
        pub.publish([events[0]])
        pub.drop_next(2)  # lost on the wire; the old-form server has them
        for ev in events[1:]:
            pub.publish([ev])
        idx = connect_sub.ingester.index
        await settle(connect_sub, until, lambda: idx.pod_block_count("p") == 4, "4 blocks")
    finally:
        server.close()
    assert server.requests == [first + 1]
    assert idx.longest_prefix(keys(tokens)) == {"p": 4.0}
    s = connect_sub.stats
    assert (s.gaps, s.replays, s.replay_failures, s.rebuilds) == (1, 1, 0, 0)
    assert s.replayed_batches == 2


async def test_feed_state_tracks_last_batch_and_connection_in_connect_mode(
    connect_sub, publishers, until
) -> None:
    pub = publishers(LOOPBACK_ANY_PORT, bind=True)
    connect_sub.add_pod("p", pub.endpoint)
    state = connect_sub.feed_state("p")
    await until(lambda: state.connected is True, what="TCP connection")
    await joined(pub, connect_sub, until)
    seq = pub.publish([])
    await until(lambda: state.last_seq == seq, what="last seq")
    assert state.last_event_at is not None and state.batches >= 1
    pub.close()
    await until(lambda: state.connected is False, what="disconnect seen")


async def test_gap_beyond_the_replay_buffer_clears_and_rebuilds_the_pod(
    bind_sub, publishers, until, make_tokens, stored_chain
) -> None:
    pub = publishers(bind_sub.endpoint, topic="kv@p@m", replay_endpoint=LOOPBACK_ANY_PORT)
    bind_sub.add_pod("p", replay_endpoint=pub.replay_endpoint)
    await joined(pub, bind_sub, until)
    old, new = make_tokens(32, seed=1), make_tokens(32, seed=2)
    pub.publish(stored_chain(old))
    pub.drop_next(2, from_replay=True)  # lost everywhere: the replay cannot cover the gap
    pub.publish([AllBlocksCleared()])
    pub.publish([AllBlocksCleared()])
    pub.publish(stored_chain(new, first_hash=5000))
    idx = bind_sub.ingester.index
    await settle(bind_sub, until, lambda: bind_sub.stats.rebuilds == 1, "a rebuild")
    await settle(bind_sub, until, lambda: idx.pod_block_count("p") == 2, "new blocks")
    assert idx.longest_prefix(keys(old)) == {}
    assert idx.longest_prefix(keys(new)) == {"p": 2.0}
    s = bind_sub.stats
    assert (s.gaps, s.replays, s.replay_failures) == (1, 1, 1)
    assert bind_sub.ingester.rebuilding_pods() == ["p"]


async def test_gap_without_replay_endpoint_rebuilds_the_pod(
    bind_sub, publishers, until, make_tokens, stored_chain
) -> None:
    pub = publishers(bind_sub.endpoint, topic="kv@p@m")
    await joined(pub, bind_sub, until)
    old, new = make_tokens(32, seed=1), make_tokens(32, seed=2)
    pub.publish(stored_chain(old))
    pub.drop_next(1)
    pub.publish([])
    pub.publish(stored_chain(new, first_hash=5000))
    idx = bind_sub.ingester.index
    await settle(bind_sub, until, lambda: idx.longest_prefix(keys(new)) == {"p": 2.0}, "new")
    assert idx.longest_prefix(keys(old)) == {}
    assert (bind_sub.stats.gaps, bind_sub.stats.replays, bind_sub.stats.rebuilds) == (1, 0, 1)


async def test_publisher_restart_resets_the_pods_index(
    bind_sub, publishers, until, make_tokens, stored_chain
) -> None:
    pub = publishers(bind_sub.endpoint, topic="kv@p@m")
    await joined(pub, bind_sub, until)
    old, new = make_tokens(32, seed=1), make_tokens(32, seed=2)
    pub.publish(stored_chain(old))
    pub.publish([])
    pub.restart()
    assert pub.publish(stored_chain(new, first_hash=5000)) == 0
    idx = bind_sub.ingester.index
    await settle(bind_sub, until, lambda: bind_sub.stats.seq_resets == 1, "the reset")
    await settle(bind_sub, until, lambda: idx.longest_prefix(keys(new)) == {"p": 2.0}, "new")
    assert idx.longest_prefix(keys(old)) == {}
    assert bind_sub.stats.rebuilds == 1 and bind_sub.ingester.rebuilding_pods() == ["p"]


async def test_malformed_messages_and_payloads_are_counted_and_the_feed_goes_on(
    bind_sub, publishers, until, make_tokens, stored_chain
) -> None:
    pub = publishers(bind_sub.endpoint, topic="kv@p@m")
    await joined(pub, bind_sub, until)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(bind_sub.endpoint)
    try:
        stats = bind_sub.stats

        async def probe() -> None:
            while stats.malformed_messages < 2:
                raw.send_multipart([b"kv@p@m", b"short"])  # seq frame not 8 bytes
                raw.send_multipart([b"kv@", (0).to_bytes(8, "big"), b"\x90"])  # no pod
                await asyncio.sleep(0.01)

        task = asyncio.create_task(probe())
        await until(lambda: stats.malformed_messages >= 2, what="malformed messages")
        task.cancel()
    finally:
        raw.close(0)
    pub.publish_payload(b"\xc1 not msgpack")
    pub.publish_payload(b"\x92\xa2ts\x90")  # msgpack, but ts is a string
    tokens = make_tokens(32)
    pub.publish(stored_chain(tokens))
    idx = bind_sub.ingester.index
    await settle(bind_sub, until, lambda: idx.pod_block_count("p") == 2, "blocks after junk")
    assert stats.decode_errors == 2 and stats.gaps == 0


async def test_unknown_event_tags_over_the_wire_are_counted_and_skipped(
    bind_sub, publishers, until, make_tokens, stored_chain
) -> None:
    import msgspec

    from router.events.publisher import encode_batch

    pub = publishers(bind_sub.endpoint, topic="kv@p@m")
    await joined(pub, bind_sub, until)
    tokens = make_tokens(32)
    raw = msgspec.msgpack.decode(encode_batch(stored_chain(tokens), 1.0))
    raw[1].append(["BlockMigrated", [1], "NVME"])
    pub.publish_payload(msgspec.msgpack.encode(raw))
    idx = bind_sub.ingester.index
    await settle(bind_sub, until, lambda: idx.pod_block_count("p") == 2, "known events")
    assert bind_sub.stats.unknown_tags == 1


async def test_orphan_parent_over_the_wire_is_counted_and_keyed_fresh(
    bind_sub, publishers, until, make_tokens, stored_chain
) -> None:
    pub = publishers(bind_sub.endpoint, topic="kv@p@m")
    await joined(pub, bind_sub, until)
    tokens = make_tokens(32)
    pub.publish(stored_chain(tokens, parent=b"\xaa" * 32))
    idx = bind_sub.ingester.index
    await settle(bind_sub, until, lambda: idx.pod_block_count("p") == 2, "orphan blocks")
    assert bind_sub.stats.orphans == 1
    assert idx.longest_prefix(keys(tokens)) == {"p": 2.0}


async def test_all_blocks_cleared_over_the_wire_empties_the_pod(
    bind_sub, publishers, until, make_tokens, stored_chain
) -> None:
    pub = publishers(bind_sub.endpoint, topic="kv@p@m", wire_form="map")
    await joined(pub, bind_sub, until)
    pub.publish(stored_chain(make_tokens(64)))
    pub.publish([AllBlocksCleared()])
    await settle(bind_sub, until, lambda: bind_sub.stats.all_cleared == 1, "the clear")
    assert bind_sub.ingester.index.pod_block_count("p") == 0


async def test_pod_removed_from_registry_leaves_the_index_and_is_not_listened_to(
    connect_sub, publishers, until, make_tokens, stored_chain
) -> None:
    registry = PodRegistry()
    connect_sub.attach(registry)
    pub = publishers(LOOPBACK_ANY_PORT, bind=True)
    registry.upsert(Pod("10.0.0.9:8000", kv_events_endpoint=pub.endpoint))
    connect_sub.add_pod("10.0.0.9:8000", pub.endpoint)
    await joined(pub, connect_sub, until)
    tokens = make_tokens(32)
    pub.publish(stored_chain(tokens))
    idx = connect_sub.ingester.index
    await settle(connect_sub, until, lambda: idx.pod_block_count("10.0.0.9:8000") == 2, "blocks")
    registry.remove("10.0.0.9:8000")
    assert idx.pods() == [] and idx.longest_prefix(keys(tokens)) == {}
    pub.publish(stored_chain(make_tokens(32, seed=5)))
    await asyncio.sleep(0.1)
    assert idx.pods() == []


async def test_publisher_frames_match_the_spec_worked_example_byte_for_byte() -> None:
    import msgspec

    from router.events.types import BlockStored

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    pub = KVEventPublisher(
        f"tcp://127.0.0.1:{port}", topic="kv@10.0.0.7@llama", data_parallel_rank=0, context=ctx
    )
    try:
        while not sub.poll(10):  # wait for the connection: probes until one arrives
            pub.publish([], ts=0.0)
        while sub.poll(50):
            sub.recv_multipart()
        skipped = 41 - pub.next_seq
        pub.drop_next(skipped)
        for _ in range(skipped):
            pub.publish([])
        hashes = [0x1A2B3C4D5E6F7081, 0xF0E0D0C0B0A09080]
        ev = BlockStored(hashes, None, list(range(32)), 16, None, "GPU", None)
        assert pub.publish([ev], ts=1732400000.25) == 41
        assert sub.poll(2000)
        topic, seq, payload = sub.recv_multipart()
    finally:
        pub.close()
        sub.close(0)
        ctx.term()
    assert topic == b"kv@10.0.0.7@llama"
    assert seq == bytes.fromhex("0000000000000029")
    expected = [
        1732400000.25,
        [["BlockStored", hashes, None, list(range(32)), 16, None, "GPU", None]],
        0,
    ]
    assert payload == msgspec.msgpack.encode(expected)


async def test_replay_socket_answers_buffered_batches_then_the_end_marker(publishers) -> None:
    """vLLM 0.32's `_service_replay` form: `[b"", topic, seq, payload]` per batch, then
    `[b"", b"", END, b""]`."""
    pub = publishers(
        "tcp://127.0.0.1:*", bind=True, replay_endpoint="tcp://127.0.0.1:*", topic="kv@p@m"
    )
    payloads = [pub.publish([], ts=float(i)) for i in range(5)]
    assert payloads == [0, 1, 2, 3, 4]
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", (3).to_bytes(8, "big")])
        got = []
        while True:
            assert dealer.poll(2000)
            frames = dealer.recv_multipart()
            got.append(frames)
            if frames[2] == (-1).to_bytes(8, "big", signed=True):
                break
    finally:
        dealer.close(0)
        ctx.term()
    assert [f[:2] for f in got[:2]] == [[b"", b"kv@p@m"]] * 2
    assert [int.from_bytes(f[2], "big") for f in got[:2]] == [3, 4]
    assert [decode_batch(f[3]).ts for f in got[:2]] == [3.0, 4.0]
    assert got[2] == [b"", b"", b"\xff" * 8, b""]


async def test_resolve_pod_maps_topic_ids_and_drops_pods_it_does_not_know(
    publishers, until, make_tokens, stored_chain
) -> None:
    settings = EventsSettings(endpoint=LOOPBACK_ANY_PORT)
    known = {"10.0.0.7": "10.0.0.7:8000"}
    sub = KVEventSubscriber(KVEventIngester(BlockIndex(), BLOCK, settings), resolve_pod=known.get)
    await sub.start()
    try:
        stranger = publishers(sub.endpoint, topic="kv@10.9.9.9@llama")
        pub = publishers(sub.endpoint, topic="kv@10.0.0.7@llama")
        await joined(pub, sub, until)
        tokens = make_tokens(32)
        pub.publish(stored_chain(tokens))

        async def probe_stranger() -> None:
            while sub.stats.unknown_pods == 0:
                stranger.publish([])
                await asyncio.sleep(0.01)

        await asyncio.wait_for(probe_stranger(), timeout=5)
        idx = sub.ingester.index
        await settle(sub, until, lambda: idx.pod_block_count("10.0.0.7:8000") == 2, "blocks")
        assert idx.pods() == ["10.0.0.7:8000"]
        assert sub.models == {"10.0.0.7:8000": "llama"}
    finally:
        await sub.close()


@pytest.mark.parametrize(
    "limits",
    [
        {"replay_timeout_s": 0.2},  # the replay times out
        {"replay_timeout_s": 30.0, "max_held_during_replay": 2},  # live backlog gives up first
    ],
)
async def test_replay_that_never_answers_ends_in_a_rebuild(
    publishers, until, make_tokens, stored_chain, limits
) -> None:
    import zmq.asyncio

    s = EventsSettings(mode="connect", endpoint=LOOPBACK_ANY_PORT, **limits)
    sub = KVEventSubscriber(KVEventIngester(BlockIndex(), BLOCK, s))
    await sub.start()
    silent = zmq.asyncio.Context.instance().socket(zmq.ROUTER)  # accepts, never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent_port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        pub = publishers(LOOPBACK_ANY_PORT, bind=True)
        sub.add_pod("p", pub.endpoint, f"tcp://127.0.0.1:{silent_port}")
        await joined(pub, sub, until)
        old, new = make_tokens(32, seed=1), make_tokens(32, seed=2)
        pub.publish(stored_chain(old))
        pub.drop_next(1)
        pub.publish([])
        pub.publish(stored_chain(new, first_hash=900))
        pub.publish([])
        pub.publish([])
        idx = sub.ingester.index
        await settle(sub, until, lambda: sub.stats.replay_failures == 1, "replay failure")
        await settle(sub, until, lambda: idx.longest_prefix(keys(new)) == {"p": 2.0}, "new")
        assert idx.longest_prefix(keys(old)) == {}
        assert (sub.stats.replays, sub.stats.rebuilds) == (1, 1)
    finally:
        silent.close(0)
        await sub.close()


async def test_sync_pods_follows_the_registrys_event_endpoints(
    connect_sub, publishers, until, make_tokens, stored_chain
) -> None:
    registry = PodRegistry()
    a = publishers(LOOPBACK_ANY_PORT, bind=True)
    b = publishers(LOOPBACK_ANY_PORT, bind=True)
    registry.upsert(Pod("10.0.0.1:8000", kv_events_endpoint=a.endpoint))
    registry.upsert(Pod("10.0.0.2:8000", kv_events_endpoint=b.endpoint))
    registry.upsert(Pod("10.0.0.3:8000"))  # no events endpoint: not listened to
    connect_sub.sync_pods(registry)
    await joined(a, connect_sub, until)
    await joined(b, connect_sub, until)
    b.publish(stored_chain(make_tokens(32)))
    idx = connect_sub.ingester.index
    await settle(connect_sub, until, lambda: idx.pod_block_count("10.0.0.2:8000") == 2, "b")
    registry.upsert(Pod("10.0.0.2:8000"))  # b no longer announces an events endpoint
    connect_sub.sync_pods(registry)
    assert idx.pod_block_count("10.0.0.2:8000") == 0
    b.publish(stored_chain(make_tokens(32, seed=3)))
    a.publish(stored_chain(make_tokens(32, seed=4)))
    await settle(connect_sub, until, lambda: idx.pod_block_count("10.0.0.1:8000") == 2, "a")
    assert idx.pod_block_count("10.0.0.2:8000") == 0
