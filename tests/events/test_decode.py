"""Decoding vLLM KV-event payloads in both wire forms, with the tolerance the spec demands."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.events.decode import EventDecodeError, decode_batch
from router.events.publisher import encode_batch
from router.events.types import AllBlocksCleared, BlockRemoved, BlockStored

enc = msgspec.msgpack.encode
TOKENS = list(range(32))


def test_array_form_with_unsigned_64bit_and_bytes_hashes_decodes_to_structs() -> None:
    payload = enc(
        [
            1732400000.25,
            [
                ["BlockStored", [2**64 - 1, b"\x01" * 32], None, TOKENS, 16, None, "GPU", None],
                ["BlockRemoved", [7], "CPU"],
                ["AllBlocksCleared"],
            ],
            0,
        ]
    )
    batch = decode_batch(payload)
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [2**64 - 1, b"\x01" * 32]
    assert stored.token_ids == TOKENS and stored.medium == "GPU"
    assert isinstance(removed, BlockRemoved) and removed.medium == "CPU"
    assert isinstance(cleared, AllBlocksCleared)
    assert batch.ts == 1732400000.25 and batch.data_parallel_rank == 0
    assert batch.unknown_tags == ()


def test_array_form_without_trailing_optionals_and_with_unknown_trailing_fields() -> None:
    short = enc([1.0, [["BlockStored", [1, 2], 9, TOKENS, 16]]])
    long = enc(
        [1.0, [["BlockStored", [1, 2], 9, TOKENS, 16, 3, "CPU", "ad", [None, None], 0, "x"]], 2, 9]
    )
    (s,) = decode_batch(short).events
    assert s.parent_block_hash == 9 and s.medium is None and s.lora_name is None
    (ll,) = decode_batch(long).events
    assert ll.medium == "CPU" and ll.lora_name == "ad" and ll.lora_id == 3


MAP_EVENTS = [
    {
        "type": "BlockStored",
        "block_hashes": [b"h1", b"h2"],
        "parent_block_hash": None,
        "token_ids": TOKENS,
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,  # newer field we do not model
        "kv_cache_spec_kind": "full_attention",
    },
    {"type": "BlockRemoved", "block_hashes": [b"h1"], "medium": None},
    {"type": "AllBlocksCleared"},
]


@pytest.mark.parametrize(
    "payload",
    [
        enc([2.5, MAP_EVENTS]),  # vLLM v0.28: map events inside an array batch
        enc([2.5, MAP_EVENTS, 1]),
        enc({"ts": 2.5, "events": MAP_EVENTS}),  # a map batch, tolerated too
    ],
)
def test_map_form_events_with_type_key_and_unknown_keys_decode_like_array_form(payload) -> None:
    batch = decode_batch(payload)
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.block_hashes == [b"h1", b"h2"]
    assert stored.token_ids == TOKENS and stored.medium == "GPU"
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == [b"h1"]
    assert isinstance(cleared, AllBlocksCleared)
    assert batch.ts == 2.5 and batch.unknown_tags == ()


def test_mixed_array_and_map_events_in_one_batch_decode() -> None:
    batch = decode_batch(
        enc([1.0, [["AllBlocksCleared"], {"type": "BlockRemoved", "block_hashes": [3]}]])
    )
    assert [type(e).__name__ for e in batch.events] == ["AllBlocksCleared", "BlockRemovedMap"]


def test_unknown_event_tags_are_skipped_and_reported_in_either_form() -> None:
    arr = enc([1.0, [["BlockMoved", 1, 2], ["BlockRemoved", [5]]]])
    mp = enc([1.0, [{"type": "Fancy"}, {"type": "AllBlocksCleared"}]])
    a = decode_batch(arr)
    assert a.unknown_tags == ("BlockMoved",) and isinstance(a.events[0], BlockRemoved)
    m = decode_batch(mp)
    assert m.unknown_tags == ("Fancy",) and isinstance(m.events[0], AllBlocksCleared)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1\x00",  # not msgpack
        b"",
        enc("hello"),
        enc([1.0]),
        enc(["ts", []]),
        enc([1.0, "events"]),
        enc([1.0, [42]]),
        enc([1.0, [["BlockStored", "not-a-list", None, [], 16]]]),
        enc([1.0, [["BlockStored", [[1, 2]], None, [], 16]]]),  # unhashable engine hash
        enc({"ts": 1.0}),
        enc({"ts": 1.0, "events": [{"type": "BlockRemoved"}]}),
    ],
)
def test_undecodable_payloads_raise_event_decode_error(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


hashes = st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=32))
stored = st.builds(
    BlockStored,
    block_hashes=st.lists(hashes, min_size=1, max_size=4),
    parent_block_hash=st.none() | hashes,
    token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=64),
    block_size=st.integers(1, 64),
    lora_id=st.none() | st.integers(0, 100),
    medium=st.sampled_from([None, "GPU", "CPU", "disk"]),
    lora_name=st.none() | st.text(max_size=8),
)
removed = st.builds(
    BlockRemoved,
    block_hashes=st.lists(hashes, max_size=4),
    medium=st.sampled_from([None, "GPU", "CPU"]),
)
events = st.lists(st.one_of(stored, removed, st.just(AllBlocksCleared())), max_size=5)


@given(events=events, form=st.sampled_from(["array", "map"]), dp=st.none() | st.integers(0, 7))
def test_encode_then_decode_round_trips_in_both_forms(events, form, dp) -> None:
    batch = decode_batch(encode_batch(events, 12.5, dp, form))
    assert batch.ts == 12.5 and batch.data_parallel_rank == dp
    assert len(batch.events) == len(events)
    for got, want in zip(batch.events, events, strict=True):
        assert isinstance(got, type(want))
        assert msgspec.structs.asdict(got) == msgspec.structs.asdict(want)
