"""Applying KV events to a BlockIndex with kvroute's own keys (no sockets here)."""

from __future__ import annotations

import logging

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.blocks import BlockConfig, token_block_keys
from router.events.ingest import KVEventIngester
from router.events.publisher import encode_batch
from router.events.settings import EventsSettings
from router.events.types import AllBlocksCleared, BlockRemoved, BlockStored
from router.index import BlockIndex, Tier


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ingester(block_size: int = 16, seed: int = 7, **overrides) -> KVEventIngester:
    return KVEventIngester(
        BlockIndex(),
        BlockConfig(mode="tokens", block_size=block_size, seed=seed),
        EventsSettings(**overrides),
        clock=FakeClock(),
    )


def test_keys_from_events_equal_the_keys_the_router_computes_for_the_prompt(
    make_tokens, stored_chain
) -> None:
    ing = ingester()
    tokens = make_tokens(16 * 10)
    for ev in stored_chain(tokens, per_event=3):  # four events chained through parents
        ing.apply_events("pod-a", [ev])
    request_keys = token_block_keys([*tokens, 1, 2, 3], 16, seed=7)
    assert ing.index.longest_prefix(request_keys) == {"pod-a": 10.0}
    assert ing.stats.blocks_stored == 10 and ing.stats.orphans == 0


def test_lora_name_is_the_chain_extra_key(make_tokens, stored_chain) -> None:
    ing = ingester()
    tokens = make_tokens(64)
    ing.apply_events("p", stored_chain(tokens, lora_name="sql-adapter"))
    assert ing.index.longest_prefix(token_block_keys(tokens, 16, 7)) == {}
    keys = token_block_keys(tokens, 16, 7, extra="sql-adapter")
    assert ing.index.longest_prefix(keys) == {"p": 4.0}


def test_unknown_parent_is_an_orphan_keyed_as_a_fresh_chain(make_tokens, stored_chain) -> None:
    ing = ingester()
    tokens = make_tokens(32)
    ing.apply_events("p", stored_chain(tokens, parent=0xDEAD))
    assert ing.stats.orphans == 1
    assert ing.index.longest_prefix(token_block_keys(tokens, 16, 7)) == {"p": 2.0}


def test_block_removed_drops_blocks_by_engine_hash_and_breaks_the_prefix(
    make_tokens, stored_chain
) -> None:
    ing = ingester()
    tokens = make_tokens(16 * 4)
    ing.apply_events("p", stored_chain(tokens, first_hash=50))
    ing.apply_events("p", [BlockRemoved(block_hashes=[52, 999])])
    keys = token_block_keys(tokens, 16, 7)
    assert ing.index.longest_prefix(keys) == {"p": 2.0}
    assert ing.index.pod_block_count("p") == 3
    assert ing.stats.blocks_removed == 1


def test_all_blocks_cleared_empties_only_that_pod(make_tokens, stored_chain) -> None:
    ing = ingester()
    tokens = make_tokens(32)
    ing.apply_events("a", stored_chain(tokens))
    ing.apply_events("b", stored_chain(tokens))
    ing.apply_events("a", [AllBlocksCleared()])
    assert ing.index.longest_prefix(token_block_keys(tokens, 16, 7)) == {"b": 2.0}
    assert ing.stats.all_cleared == 1


def test_medium_sets_the_tier(make_tokens, stored_chain) -> None:
    ing = ingester()
    tokens = make_tokens(32)
    ing.apply_events("p", stored_chain(tokens, medium="CPU"))
    key = token_block_keys(tokens, 16, 7)[0]
    assert ing.index.holders(key) == [("p", Tier.CPU)]


def test_engine_block_size_multiple_of_router_size_keys_at_router_size(
    make_tokens, stored_chain
) -> None:
    ing = ingester(block_size=16)
    tokens = make_tokens(32 * 3)
    first, second = (
        stored_chain(tokens[:64], block_size=32),
        stored_chain(tokens[64:], block_size=32, first_hash=2000, parent=1001),
    )
    ing.apply_events("p", first + second)
    keys = token_block_keys(tokens, 16, 7)
    assert ing.index.longest_prefix(keys) == {"p": 6.0}
    ing.apply_events("p", [BlockRemoved(block_hashes=[1001])])  # second engine block
    assert ing.index.longest_prefix(keys) == {"p": 2.0}
    assert ing.index.pod_block_count("p") == 4
    assert ing.stats.blocks_removed == 1


def test_engine_block_size_not_a_multiple_is_counted_and_skipped(make_tokens, stored_chain) -> None:
    ing = ingester(block_size=16)
    ing.apply_events("p", stored_chain(make_tokens(48), block_size=24))
    assert ing.stats.block_size_errors == 1 and ing.index.entry_count() == 0


@pytest.mark.parametrize(
    "event",
    [
        BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[1] * 20, block_size=16),
        BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[-1] * 16, block_size=16),
        BlockStored(
            block_hashes=[1], parent_block_hash=None, token_ids=[2**40] * 16, block_size=16
        ),
    ],
)
def test_inconsistent_stored_event_is_counted_and_skipped(event: BlockStored) -> None:
    ing = ingester()
    ing.apply_events("p", [event])
    assert ing.stats.invalid_events == 1 and ing.index.entry_count() == 0


def test_undecodable_payload_is_logged_once_per_pod_per_minute_with_seq(caplog) -> None:
    ing = ingester()
    clock = ing.clock
    assert isinstance(clock, FakeClock)
    with caplog.at_level(logging.WARNING, logger="router.events.ingest"):
        for seq in range(5):
            ing.apply_payload("p", seq, b"\xc1junk")
        ing.apply_payload("q", 9, b"\xc1junk")
        clock.t += 61
        ing.apply_payload("p", 77, b"\xc1junk")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "pod p seq 0" in lines[0] and "pod q seq 9" in lines[1]
    assert "pod p seq 77" in lines[2] and "4 more" in lines[2]
    assert ing.stats.decode_errors == 7


def test_unknown_tags_are_counted_and_known_events_still_apply(make_tokens, stored_chain) -> None:
    ing = ingester()
    tokens = make_tokens(32)
    (ev,) = stored_chain(tokens)
    raw = msgspec.msgpack.decode(encode_batch([ev], 1.0))
    raw[1].insert(0, ["KVCacheCreated", 1, 2, 3])
    ing.apply_payload("p", 0, msgspec.msgpack.encode(raw))
    assert ing.stats.unknown_tags == 1 and ing.stats.blocks_stored == 2


async def test_one_pods_burst_does_not_starve_another(make_tokens, stored_chain) -> None:
    ing = ingester(batches_per_turn=2)
    tokens = make_tokens(32)
    burst = encode_batch(stored_chain(tokens), 1.0)
    for seq in range(100):
        ing.submit("busy", seq, burst)
    ing.submit("quiet", 0, encode_batch(stored_chain(tokens, first_hash=5), 1.0))
    applied = ing.drain_slice(budget_s=0.0)  # one turn: the first pod only
    assert applied == 2 and ing.index.pod_block_count("quiet") == 0
    ing.drain_slice(budget_s=0.0)
    assert ing.index.pod_block_count("quiet") == 2
    assert ing.pending == 98
    await ing.drain()
    assert ing.pending == 0


async def test_queue_overflow_drops_the_queue_and_rebuilds_the_pod(
    make_tokens, stored_chain
) -> None:
    ing = ingester(max_queued_batches_per_pod=3)
    tokens = make_tokens(32)
    ing.apply_events("p", stored_chain(tokens[:16], first_hash=1))
    for seq in range(4):
        ing.submit("p", seq, encode_batch([], 1.0))
    ing.submit("p", 4, encode_batch(stored_chain(tokens[16:], first_hash=9), 1.0))
    await ing.drain()
    assert ing.stats.queue_overflows == 1 and ing.stats.rebuilds == 1
    assert ing.rebuilding_pods() == ["p"]
    assert ing.index.pod_block_count("p") == 1  # old block cleared, new one applied


async def test_reset_lands_in_order_and_all_blocks_cleared_ends_rebuilding(
    make_tokens, stored_chain
) -> None:
    ing = ingester()
    tokens = make_tokens(48)
    ing.submit("p", 0, encode_batch(stored_chain(tokens[:16]), 1.0))
    ing.reset_pod("p", "test")
    ing.submit("p", 1, encode_batch(stored_chain(tokens[16:], first_hash=77), 1.0))
    await ing.drain()
    assert ing.index.pod_block_count("p") == 2
    assert ing.rebuilding_pods() == ["p"]
    ing.apply_events("p", [AllBlocksCleared()])
    assert ing.rebuilding_pods() == []


def test_forget_pod_drops_queue_and_index_entries(make_tokens, stored_chain) -> None:
    ing = ingester()
    ing.apply_events("p", stored_chain(make_tokens(32)))
    ing.submit("p", 0, encode_batch([], 1.0))
    ing.forget_pod("p")
    assert ing.pending == 0 and ing.index.pods() == []


@settings(max_examples=60, deadline=None)
@given(
    n_blocks=st.integers(1, 12),
    per_event=st.integers(1, 12),
    engine_ratio=st.sampled_from([1, 2, 4]),
    lora=st.none() | st.sampled_from(["a", "sql"]),
    seed=st.integers(0, 2**32),
)
def test_any_split_of_a_chain_into_events_keys_like_the_router_and_removes_cleanly(
    n_blocks, per_event, engine_ratio, lora, seed
) -> None:
    import random

    rng = random.Random(seed)
    router_bs = 4
    engine_bs = router_bs * engine_ratio
    tokens = [rng.randrange(50_000) for _ in range(n_blocks * engine_bs)]
    ing = ingester(block_size=router_bs)
    events = []
    parent = None
    for start in range(0, n_blocks, per_event):
        hashes = [rng.getrandbits(64) for _ in range(min(per_event, n_blocks - start))]
        chunk = tokens[start * engine_bs : (start + len(hashes)) * engine_bs]
        events.append(BlockStored(hashes, parent, chunk, engine_bs, None, None, lora))
        parent = hashes[-1]
    ing.apply_events("p", events)
    keys = token_block_keys(tokens, router_bs, 7, extra=lora)
    assert ing.index.longest_prefix(keys) == {"p": float(len(keys))}
    assert ing.stats.orphans == 0
    ing.apply_events("p", [BlockRemoved([h for ev in events for h in ev.block_hashes])])
    assert ing.index.entry_count() == 0 and len(ing.index) == 0


def test_an_unexpected_error_while_applying_is_counted_and_the_next_batch_applies(
    make_tokens, stored_chain
) -> None:
    class FlakyIndex(BlockIndex):
        calls = 0

        def add_blocks(self, *args, **kwargs) -> None:
            FlakyIndex.calls += 1
            if FlakyIndex.calls == 1:
                raise RuntimeError("disk on fire")
            super().add_blocks(*args, **kwargs)

    ing = KVEventIngester(FlakyIndex(), BlockConfig(mode="tokens"), clock=FakeClock())
    ing.apply_payload("p", 0, encode_batch(stored_chain(make_tokens(32)), 1.0))
    ing.apply_payload("p", 1, encode_batch(stored_chain(make_tokens(32, seed=1)), 1.0))
    assert ing.stats.apply_errors == 1 and ing.index.pod_block_count("p") == 2
