"""vLLM's KV-event wire structs (the array form older vLLM releases put on the wire; the map
form of newer ones, e.g. v0.28 and v0.32, below).

Field order matters: with `array_like=True` a struct is a msgpack array in declaration order,
and `tag=True` puts the class name first, e.g. `["BlockStored", [h1, h2], parent, [...], 16,
None, "GPU", None]`. Trailing optional fields may be absent on the wire (older senders) and are
left out when they hold their default (`omit_defaults`). Engine hashes are opaque: msgpack ints
(64-bit, possibly unsigned) in older releases, bytes (e.g. SHA-256) in newer ones.
"""

from __future__ import annotations

from typing import Any

import msgspec

EngineHash = int | bytes


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged union; the tag is the class name."""


class BlockStored(KVCacheEvent):
    block_hashes: list[EngineHash]
    #: Engine hash of the block just before the first one here; None = chain start.
    parent_block_hash: EngineHash | None
    #: Tokens of all the blocks, concatenated (len = len(block_hashes) * block_size).
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None  # deprecated by vLLM in favour of lora_name
    #: "GPU", "CPU", ...; None means GPU.
    medium: str | None = None
    lora_name: str | None = None
    #: One entry per block (multimodal hashes, cache salt) in recent vLLM; opaque to us.
    extra_keys: list[Any] | None = None
    #: KV-cache group of a hybrid model (e.g. full attention + sliding window); None = the
    #: engine does not say (one group). vLLM >= 0.32.
    group_idx: int | None = None
    #: The group's kind: "full_attention", "sliding_window", "mamba", ... (vLLM's
    #: `KVCacheSpecKind`); only stored events carry it.
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# ------------------------------------------------------------------------------------- map form
# Newer vLLM releases (e.g. v0.28, v0.32) drop `array_like` from the events but not from the
# batch: on the wire a batch is still `[ts, [event...], dp_rank]`, and each event is a map
# whose "type" key names the class, with the other keys named after the fields. The map
# structs subclass the array ones, so `isinstance(event, BlockStored)` holds for either form.


class BlockStoredMap(BlockStored, array_like=False, tag_field="type", tag="BlockStored"):
    pass


class BlockRemovedMap(BlockRemoved, array_like=False, tag_field="type", tag="BlockRemoved"):
    pass


class AllBlocksClearedMap(
    AllBlocksCleared, array_like=False, tag_field="type", tag="AllBlocksCleared"
):
    pass


KVEventMap = BlockStoredMap | BlockRemovedMap | AllBlocksClearedMap


class KVEventBatchMap(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A batch of map-form events (the batch itself stays an array)."""

    ts: float
    events: list[KVEventMap]
    data_parallel_rank: int | None = None


# ---------------------------------------------------------------------------------- packed form
# What the ingester decodes into (`decode.decode_batch_packed`): the same structs, except that
# a `BlockStored`'s token ids are kept as their raw msgpack and then packed into an
# `array('I')` by the C extension, so no Python int is made per token. Subclasses again, with
# the same tags: `isinstance(event, BlockStored)` holds and the wire is the same.


class BlockStoredPacked(BlockStored, tag="BlockStored"):
    token_ids: msgspec.Raw  # type: ignore[assignment]  # an array('I') once decoded


class BlockStoredPackedMap(BlockStoredMap, tag="BlockStored"):
    token_ids: msgspec.Raw  # type: ignore[assignment]


class KVEventBatchPacked(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStoredPacked | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class KVEventBatchPackedMap(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStoredPackedMap | BlockRemovedMap | AllBlocksClearedMap]
    data_parallel_rank: int | None = None
