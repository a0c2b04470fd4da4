"""Payload → events: decodes one vLLM KV-event batch in either wire form.

Owns the tolerance rules for what vLLM puts on the wire:
- array form (older releases; `array_like` structs, tag = class name in front) and map form
  (newer releases, e.g. v0.28 and v0.32: events are maps with a `type` key inside a batch
  that is still an array, `[ts, [events], data_parallel_rank]`; 0.32 adds `group_idx`,
  `kv_cache_spec_kind` and `kv_cache_spec_sliding_window`, which the ingester uses to index
  only full-attention groups, and `locality`/`ownership`/`session_id`, which are ignored);
  the batch and each event are accepted in either shape independently (a batch map
  `{ts, events, data_parallel_rank}` too, though no release is known to send one);
- engine hashes as msgpack ints (including unsigned 64-bit) or bytes;
- trailing optional fields absent, and unknown trailing fields (array form) or unknown keys
  (map form) from newer senders, which are ignored.

Fast path: a typed msgspec decode of the array form, then of the map-event form. Anything both
reject — unknown event tags, mixed or odd shapes — is decoded generically and each event
converted on its own, so one unknown event type skips only that event. A payload that is not
msgpack, or whose known events do not validate, raises `EventDecodeError` and nothing of it is
applied (a batch is all or nothing).

`decode_batch_packed` is what the ingester calls: the same events, but a `BlockStored`'s token
ids come as an `array('I')` packed straight from the msgpack by the C extension
`router.events._tokpack` (no Python int per token: that was half of decoding). The extension is
built when the package is installed and a compiler is there; without it, or for any payload it
does not take (a token id out of uint32 range, an odd shape), `decode_batch` decodes instead, so
what a payload means never depends on the extension.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

import msgspec

from router.events.types import (
    AllBlocksCleared,
    AllBlocksClearedMap,
    BlockRemoved,
    BlockRemovedMap,
    BlockStored,
    BlockStoredMap,
    BlockStoredPacked,
    BlockStoredPackedMap,
    KVEvent,
    KVEventBatch,
    KVEventBatchMap,
    KVEventBatchPacked,
    KVEventBatchPackedMap,
)

try:
    from router.events._tokpack import pack_u32_array
except ImportError:  # built optionally (no compiler at install time): decode_batch does it all
    pack_u32_array = None


class EventDecodeError(ValueError):
    """The payload is not a KV-event batch we can apply; the message says where it breaks."""


@dataclass(slots=True)
class DecodedBatch:
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    #: Tags of events skipped because we do not know them (empty on the fast path).
    unknown_tags: tuple[str, ...] = ()


_TYPED_DECODERS: tuple[msgspec.msgpack.Decoder[Any], ...] = (
    msgspec.msgpack.Decoder(KVEventBatch),
    msgspec.msgpack.Decoder(KVEventBatchMap),
)
_PACKED_DECODERS: tuple[msgspec.msgpack.Decoder[Any], ...] = (
    msgspec.msgpack.Decoder(KVEventBatchPacked),
    msgspec.msgpack.Decoder(KVEventBatchPackedMap),
)
_PACKED_STORED = (BlockStoredPacked, BlockStoredPackedMap)
#: The packed token ids are read as array('I'): only where that is 4 bytes an item.
PACKED_AVAILABLE = pack_u32_array is not None and array("I").itemsize == 4
_ARRAY_EVENT_TYPES: dict[str, type[KVEvent]] = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}
_MAP_EVENT_TYPES: dict[str, type[KVEvent]] = {
    "BlockStored": BlockStoredMap,
    "BlockRemoved": BlockRemovedMap,
    "AllBlocksCleared": AllBlocksClearedMap,
}


def decode_batch(payload: bytes | memoryview) -> DecodedBatch:
    """Decode one batch payload; raises `EventDecodeError` when it cannot be applied."""
    for decoder in _TYPED_DECODERS:
        try:
            batch = decoder.decode(payload)
        except msgspec.DecodeError:  # ValidationError included
            continue
        return DecodedBatch(batch.ts, batch.events, batch.data_parallel_rank)
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"payload is not msgpack: {exc}") from None
    return _decode_generic(raw)


def decode_batch_packed(payload: bytes | memoryview) -> DecodedBatch:
    """`decode_batch`, with each `BlockStored`'s `token_ids` an `array('I')` (see module doc)."""
    if not PACKED_AVAILABLE:
        return decode_batch(payload)
    pack = pack_u32_array
    for decoder in _PACKED_DECODERS:
        try:
            batch = decoder.decode(payload)
        except msgspec.DecodeError:
            continue
        for ev in batch.events:
            if isinstance(ev, _PACKED_STORED):
                packed = pack(ev.token_ids)  # type: ignore[misc]
                if packed is None:
                    return decode_batch(payload)
                ev.token_ids = array("I", packed)
        return DecodedBatch(batch.ts, batch.events, batch.data_parallel_rank)
    return decode_batch(payload)


def _decode_generic(raw: Any) -> DecodedBatch:
    if isinstance(raw, list):
        if len(raw) < 2:
            raise EventDecodeError(f"batch array has {len(raw)} elements, needs [ts, events]")
        ts, events, dp_rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict):
        if "ts" not in raw or "events" not in raw:
            raise EventDecodeError("batch map lacks 'ts' or 'events'")
        ts, events, dp_rank = raw["ts"], raw["events"], raw.get("data_parallel_rank")
    else:
        raise EventDecodeError(f"batch is a msgpack {type(raw).__name__}, not an array or map")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise EventDecodeError(f"batch ts is {type(ts).__name__}, not a number")
    if not isinstance(events, list):
        raise EventDecodeError(f"batch events is {type(events).__name__}, not an array")
    if dp_rank is not None and (isinstance(dp_rank, bool) or not isinstance(dp_rank, int)):
        raise EventDecodeError(f"data_parallel_rank is {type(dp_rank).__name__}, not an int")
    out: list[KVEvent] = []
    unknown: list[str] = []
    for i, ev in enumerate(events):
        if isinstance(ev, list) and ev and isinstance(ev[0], str):
            tag, types = ev[0], _ARRAY_EVENT_TYPES
        elif isinstance(ev, dict) and isinstance(ev.get("type"), str):
            tag, types = ev["type"], _MAP_EVENT_TYPES
        else:
            raise EventDecodeError(f"event {i} is neither a tagged array nor a map with 'type'")
        cls = types.get(tag)
        if cls is None:
            unknown.append(tag)
            continue
        try:
            out.append(msgspec.convert(ev, cls))
        except msgspec.ValidationError as exc:
            raise EventDecodeError(f"event {i} ({tag}): {exc}") from None
    return DecodedBatch(float(ts), out, dp_rank, tuple(unknown))
