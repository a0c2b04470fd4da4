"""Fuzzing the KV-event payload decode (`router.events.decode`) and its application to the index.

Inputs: random bytes, random msgpack values, batch arrays and maps with wrong tags, wrong arity,
wrong field types, unsigned/huge/negative integers, huge arrays, and valid batches of both wire
forms with fields swapped for junk. Every payload either decodes to events the ingester applies,
or raises `EventDecodeError`, which the ingester counts (`decode_errors`) and skips; no other
exception, nothing logged as a crash, and the feed keeps applying the next good batch.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import currently_in_test_context, example, given
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from router.blocks import BlockConfig
from router.events.decode import EventDecodeError, decode_batch
from router.events.ingest import KVEventIngester
from router.index import BlockIndex
from tests.fuzz.conftest import FUZZ, assert_no_crash_logged

enc = msgspec.msgpack.encode
POD = "127.0.0.1:8000"
GOOD = enc([1.0, [["BlockStored", [1], None, list(range(16)), 16, None, "GPU", None]], 0])

msgpack_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
msgpack_value = st.recursive(
    msgpack_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=12,
)
#: A cheap wrong-typed field value (the nested strategy above is slow to draw in bulk).
junk = st.one_of(msgpack_scalar, st.lists(msgpack_scalar, max_size=3))
tag = st.sampled_from(
    ["BlockStored", "BlockRemoved", "AllBlocksCleared", "BlockMoved", "", "blockstored"]
)
hashes = st.one_of(
    st.lists(
        st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=32)), max_size=6
    ),
    junk,
)
tokens = st.one_of(
    st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), max_size=64),
    st.builds(lambda n: list(range(n)), st.sampled_from([16, 32, 48])),
    junk,
)
array_event = st.builds(
    lambda t, fields, cut: [t, *fields][: cut or None],
    tag,
    st.tuples(
        hashes,
        st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1), junk),
        tokens,
        st.one_of(st.sampled_from([16, 32, 0, -16, 7, 2**40]), junk),
        st.one_of(st.none(), junk),
        st.sampled_from([None, "GPU", "CPU", "disk", "", 3]),
        st.one_of(st.none(), st.text(max_size=5)),
        st.one_of(st.none(), junk),
        st.one_of(st.none(), st.integers(min_value=-3, max_value=3)),
        st.sampled_from([None, "full_attention", "sliding_window", 1]),
        junk,
    ),
    st.integers(min_value=0, max_value=14),  # wrong arity: cut short or with extra fields
)
map_event = st.builds(
    lambda t, body: {"type": t, **body},
    tag,
    st.fixed_dictionaries(
        {},
        optional={
            "block_hashes": hashes,
            "parent_block_hash": st.one_of(st.none(), junk),
            "token_ids": tokens,
            "block_size": st.one_of(st.sampled_from([16, 0, -1]), junk),
            "medium": st.one_of(st.none(), junk),
            "group_idx": junk,
            "kv_cache_spec_kind": junk,
            "unknown": junk,
        },
    ),
)
good_stored = st.builds(
    lambda n, first, parent, medium, seed: [
        "BlockStored",
        list(range(first, first + n)),
        parent,
        [(seed + i) % 2**32 for i in range(n * 16)],
        16,
        None,
        medium,
        None,
    ],
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=0, max_value=2**64 - 5),
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    st.sampled_from([None, "GPU", "CPU"]),
    st.integers(min_value=0, max_value=2**32),
)
good_map = good_stored.map(
    lambda ev: {
        "type": "BlockStored",
        **dict(
            zip(
                ["block_hashes", "parent_block_hash", "token_ids", "block_size"],
                ev[1:5],
                strict=True,
            )
        ),
    }
)
good_removed = st.builds(
    lambda h: ["BlockRemoved", h], st.lists(st.integers(min_value=0, max_value=2**64 - 1))
)
#: Valid events (so a good share of batches decode and reach the index) mixed with bad ones.
events = st.lists(
    st.one_of(good_stored, good_map, good_removed, array_event, map_event, junk), max_size=5
)
batch = st.one_of(
    st.builds(
        lambda ts, ev, rest: [ts, ev, *rest],
        st.one_of(st.floats(), junk),
        events,
        st.lists(junk, max_size=2),
    ),
    st.builds(
        lambda ts, ev, dp: {"ts": ts, "events": ev, "data_parallel_rank": dp},
        st.floats(),
        events,
        junk,
    ),
    msgpack_value,
)


def event(label: str) -> None:
    """Tally an outcome in hypothesis' statistics (no-op in the plain tests)."""
    if currently_in_test_context():
        hypothesis_event(label)


def apply_and_check(payload: bytes) -> None:
    try:
        decoded = decode_batch(payload)
    except EventDecodeError as e:
        event("decode error (counted, skipped)")
        assert str(e)
    else:
        event(f"decoded, {len(decoded.events)} events, {len(decoded.unknown_tags)} unknown")
    ingester = KVEventIngester(BlockIndex(), BlockConfig(mode="tokens", block_size=16))
    ingester.apply_payload(POD, 1, payload)
    stats = ingester.stats
    assert stats.apply_errors == 0  # an apply error means a bug the decode let through
    assert stats.decode_errors + stats.batches == 1
    ingester.apply_payload(POD, 2, GOOD)  # the feed goes on after any payload
    assert stats.batches >= 1 and stats.blocks_stored >= 1


@FUZZ
@given(payload=st.binary(max_size=300))
@example(payload=b"")
@example(payload=b"\xc1")  # the one byte msgpack never uses
@example(payload=b"\xdd\xff\xff\xff\xff")  # an array claiming 4 billion elements
def test_random_bytes_are_decoded_or_counted_and_skipped(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    apply_and_check(payload)
    assert_no_crash_logged(caplog)


@FUZZ
@given(value=batch)
@example(value=[1.0, [["BlockStored"]]])  # wrong arity
@example(value=[1.0, [["BlockStored", [1], None, [2**40] * 16, 16]]])  # token ids not uint32
@example(value=[1.0, [["BlockStored", [1], None, [-1] * 16, 16]]])
@example(value=[1.0, [["BlockStored", [1], None, list(range(16)), 2**64 - 1]]])
@example(value=[1.0, [["BlockRemoved", [2**64 - 1]], ["Nope", 1, 2]], True])
@example(value=[float("nan"), [], None])
def test_msgpack_batches_are_decoded_or_counted_and_skipped(
    value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    apply_and_check(enc(value))
    assert_no_crash_logged(caplog)


def test_huge_arrays_are_applied_or_skipped_without_error(caplog: pytest.LogCaptureFixture) -> None:
    n = 200_000
    huge = [
        1.0,
        [
            ["BlockStored", list(range(n // 16)), None, list(range(n)), 16, None, "GPU", None],
            ["BlockRemoved", list(range(n))],
            ["BlockStored", [1, 2], None, list(range(n)), 16],  # tokens do not match blocks
        ],
    ]
    ingester = KVEventIngester(BlockIndex(), BlockConfig(mode="tokens", block_size=16))
    ingester.apply_payload(POD, 1, enc(huge))
    assert ingester.stats.blocks_stored == n // 16
    assert ingester.stats.invalid_events == 1
    apply_and_check(enc([1.0, [None] * n]))
    assert_no_crash_logged(caplog)
