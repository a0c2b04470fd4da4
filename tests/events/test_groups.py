"""vLLM 0.32's event shapes: `[ts, [events], dp_rank]`, the map fields, and KV-cache groups.

Policy pinned here (see `router.events.ingest`): only full-attention groups are indexed; a
sliding-window (or Mamba, ...) group's stored blocks are skipped, and so are removals naming
such a group, since the groups share engine hashes.
"""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from router.blocks import BlockConfig, token_block_keys
from router.events.decode import decode_batch
from router.events.ingest import KVEventIngester
from router.events.publisher import encode_batch
from router.events.types import BlockRemoved, BlockStored
from router.index import BlockIndex

BLOCK = BlockConfig(mode="tokens", block_size=32, seed=5)


def ingester() -> KVEventIngester:
    return KVEventIngester(BlockIndex(), BLOCK)


def vllm_032_payload(tokens: list[int], hashes: list[int], **fields) -> bytes:  # type: ignore[no-untyped-def]
    """A batch as vLLM 0.32 writes it (map events; fields as seen on a real engine)."""
    event = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": tokens,
        "block_size": 32,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None] * len(hashes),
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        **fields,
    }
    return msgspec.msgpack.encode([1796168121.23, [event], 0])


def test_a_vllm_032_batch_decodes_with_its_rank_and_group_fields() -> None:
    tokens = list(range(64))
    payload = vllm_032_payload(
        tokens, [11, 12], kv_cache_spec_sliding_window=None, locality="LOCAL", session_id="s"
    )
    batch = decode_batch(payload)
    assert batch.data_parallel_rank == 0 and not batch.unknown_tags
    (ev,) = batch.events
    assert isinstance(ev, BlockStored)
    assert (ev.group_idx, ev.kv_cache_spec_kind, ev.extra_keys) == (0, "full_attention", [None] * 2)
    ing = ingester()
    ing.apply_payload("p", 0, payload)
    assert ing.index.longest_prefix(token_block_keys(tokens, 32, BLOCK.seed)) == {"p": 2.0}


def test_sliding_window_group_is_skipped_and_its_removals_do_not_touch_full_attention() -> None:
    tokens = list(range(64))
    keys = token_block_keys(tokens, 32, BLOCK.seed)
    ing = ingester()
    full = vllm_032_payload(tokens, [11, 12])
    # The same blocks in a sliding-window group carry the same engine hashes.
    window = vllm_032_payload(
        tokens, [11, 12], group_idx=1, kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=64,
    )  # fmt: skip
    ing.apply_payload("p", 0, full)
    ing.apply_payload("p", 1, window)
    assert ing.index.longest_prefix(keys) == {"p": 2.0}
    ing.apply_events("p", [BlockRemoved(block_hashes=[11, 12], medium="GPU", group_idx=1)])
    assert ing.index.longest_prefix(keys) == {"p": 2.0}  # the window group dropped them
    assert ing.stats.other_group_events == 2
    ing.apply_events("p", [BlockRemoved(block_hashes=[12], medium="GPU", group_idx=0)])
    assert ing.index.longest_prefix(keys) == {"p": 1.0}


def test_events_without_group_fields_are_indexed_as_before() -> None:
    tokens = list(range(32))
    ing = ingester()
    ev = BlockStored(block_hashes=[7], parent_block_hash=None, token_ids=tokens, block_size=32)
    ing.apply_events("p", [ev])
    assert ing.index.longest_prefix(token_block_keys(tokens, 32, BLOCK.seed)) == {"p": 1.0}
    ing.apply_events("p", [BlockRemoved(block_hashes=[7])])
    assert ing.index.pod_block_count("p") == 0


_KINDS = st.sampled_from(
    [None, "full_attention", "mla_attention", "sliding_window", "mamba", "chunked_local_attention"]
)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.tuples(st.integers(0, 3), _KINDS), min_size=1, max_size=6),
    form=st.sampled_from(["array", "map"]),
)
def test_group_fields_round_trip_both_wire_forms_and_only_full_attention_is_indexed(
    groups: list[tuple[int, str | None]], form: str
) -> None:
    tokens = list(range(32))
    events = [
        BlockStored(
            block_hashes=[100 + i],
            parent_block_hash=None,
            token_ids=tokens,
            block_size=32,
            medium="GPU",
            group_idx=g,
            kv_cache_spec_kind=kind,
        )
        for i, (g, kind) in enumerate(groups)
    ]
    batch = decode_batch(encode_batch(events, 1.0, 0, form))  # type: ignore[arg-type]
    assert [(e.group_idx, e.kv_cache_spec_kind) for e in batch.events] == groups
    ing = ingester()
    ing.apply_events("p", batch.events)
    indexed = any(kind in (None, "full_attention", "mla_attention") for _, kind in groups)
    assert ing.index.pod_block_count("p") == (1 if indexed else 0)
