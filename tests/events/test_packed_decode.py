"""The ingester's decode (`decode_batch_packed`, C token-id packer) against `decode_batch`.

Both must mean the same for every payload: the packed path is only faster. The fallback (no
extension built) is exercised by switching `PACKED_AVAILABLE` off.
"""

from __future__ import annotations

import importlib.metadata
import os
import random
import struct
from array import array

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.blocks import BlockConfig
from router.events import decode
from router.events.decode import EventDecodeError, decode_batch, decode_batch_packed
from router.events.ingest import KVEventIngester
from router.events.publisher import encode_batch
from router.events.types import BlockRemoved, BlockStored
from router.index import BlockIndex

enc = msgspec.msgpack.encode
pack = decode.pack_u32_array
needs_ext = pytest.mark.skipif(pack is None, reason="C extension router.events._tokpack not built")


def test_extension_is_built_in_ci() -> None:
    """CI installs with a compiler: a silently skipped build would lose the speed unnoticed.

    A non-editable install puts the extension in site-packages while the tests import the
    source tree (which then runs the fallback): the installed files show the build there."""
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        pytest.skip("only enforced in CI")
    files = importlib.metadata.distribution("kvroute").files or []
    installed = any(f.name.startswith("_tokpack.") for f in files)
    assert decode.PACKED_AVAILABLE or installed


@needs_ext
@pytest.mark.parametrize(
    "values",
    [[], [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1], list(range(70_000))],
    ids=["empty", "every-width", "array32"],
)
def test_packer_reads_every_unsigned_encoding(values: list[int]) -> None:
    out = pack(enc(values))
    assert out is not None and array("I", out).tolist() == values


@needs_ext
@pytest.mark.parametrize("n", [1, 12], ids=["short-tail", "fast-path"])
@pytest.mark.parametrize(
    ("code", "fmt", "value", "ok"),
    [
        (0xD0, ">b", 5, True),
        (0xD1, ">h", 300, True),
        (0xD2, ">i", 70_000, True),
        (0xD3, ">q", 2**32 - 1, True),
        (0xCF, ">Q", 7, True),
        (0xD0, ">b", -5, False),
        (0xD2, ">i", -7, False),
        (0xD3, ">q", 2**32, False),
        (0xCF, ">Q", 2**64 - 1, False),
    ],
)
def test_packer_takes_signed_encodings_only_when_in_range(
    n: int, code: int, fmt: str, value: int, ok: bool
) -> None:
    buf = bytes([0xDC]) + struct.pack(">H", n) + (bytes([code]) + struct.pack(fmt, value)) * n
    out = pack(buf)
    assert (array("I", out).tolist() == [value] * n) if ok else out is None


@needs_ext
@pytest.mark.parametrize(
    "buf",
    [
        b"",
        enc([-1]),
        enc([2**32]),
        enc([1.0]),
        enc(["a"]),
        enc(None),
        enc({}),
        enc([1, 2]) + b"\x00",
        enc(list(range(300, 320)))[:-1],
        b"\xdc\x00",
        b"\xdd\x00\x00\x00",
    ],
)
def test_packer_rejects_anything_else(buf: bytes) -> None:
    assert pack(buf) is None


def _plain(batch: decode.DecodedBatch) -> list[object]:
    """Events as builtins, token ids as lists, whichever decode made them."""
    out: list[object] = []
    for ev in batch.events:
        d = msgspec.structs.asdict(ev)
        if "token_ids" in d:
            d["token_ids"] = list(d["token_ids"])
        out.append((_kind(ev), d))
    return [batch.ts, batch.data_parallel_rank, batch.unknown_tags, out]


def _kind(ev: object) -> str:
    for cls in (BlockStored, BlockRemoved):
        if isinstance(ev, cls):
            return cls.__name__
    return type(ev).__name__


token = st.one_of(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -1, 2**64 - 1]),
)


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.lists(token, max_size=40), min_size=1, max_size=3),
    wire_form=st.sampled_from(["array", "map"]),
    with_removed=st.booleans(),
    packed=st.booleans(),
)
def test_packed_decode_means_what_decode_batch_means(
    tokens: list[list[int]], wire_form: str, with_removed: bool, packed: bool
) -> None:
    events: list[object] = [
        BlockStored([i, i + 1], None, toks, 16, None, "GPU", None) for i, toks in enumerate(tokens)
    ]
    if with_removed:
        events.insert(1, BlockRemoved([5], None))
    payload = encode_batch(events, 3.5, 1, wire_form)  # type: ignore[arg-type]
    old = decode.PACKED_AVAILABLE
    decode.PACKED_AVAILABLE = packed and pack is not None
    try:
        try:
            want: object = _plain(decode_batch(payload))
        except EventDecodeError as exc:
            want = type(exc)
        try:
            got: object = _plain(decode_batch_packed(payload))
        except EventDecodeError as exc:
            got = type(exc)
    finally:
        decode.PACKED_AVAILABLE = old
    assert got == want


def test_packed_decode_of_garbage_raises_like_decode_batch() -> None:
    with pytest.raises(EventDecodeError):
        decode_batch_packed(b"\xc1 not msgpack")
    bad_token = enc([1.0, [["BlockStored", [1], None, ["x"] * 16, 16]]])
    with pytest.raises(EventDecodeError):
        decode_batch_packed(bad_token)


def _index_state(index: BlockIndex) -> object:
    pods = {
        pod: (list(pb.keys.items()), dict(pb.engine), pb.slot) for pod, pb in index._pods.items()
    }
    return dict(index._holders), {k: dict(v) for k, v in index._lower_tier.items()}, pods


@pytest.mark.parametrize("wire_form", ["array", "map"])
def test_ingester_builds_the_same_index_with_and_without_the_extension(
    wire_form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(5)
    payloads: list[tuple[str, bytes]] = []
    for pod in ("a", "b", "c"):
        parent = None
        for n in range(12):
            hashes = [rng.getrandbits(64) for _ in range(4)]
            tokens = [rng.randrange(150_000) for _ in range(4 * 16)]
            if n == 5:
                tokens[3] = 2**32  # not a uint32: the event is counted invalid, both ways
            events: list[object] = [
                BlockStored(hashes, parent, tokens, 16, None, rng.choice(["GPU", "CPU"]), None)
            ]
            if n % 4 == 3:
                events.append(BlockRemoved(hashes[-2:], None))
            payloads.append((pod, encode_batch(events, 1.0, 0, wire_form)))  # type: ignore[arg-type]
            parent = hashes[-1] if n != 7 else rng.getrandbits(64)  # one orphan
    results = []
    for packed in (False, True):
        monkeypatch.setattr(decode, "PACKED_AVAILABLE", packed and pack is not None)
        block = BlockConfig(mode="tokens", block_size=16, seed=3)
        ing = KVEventIngester(BlockIndex(), block, clock=lambda: 1.0)
        for seq, (pod, p) in enumerate(payloads):
            ing.apply_payload(pod, seq, p)
        results.append((_index_state(ing.index), ing.stats))
    assert results[0] == results[1]
    stats = results[1][1]
    # One invalid event and three orphans a pod (after the invalid one, after a removed
    # parent, and the unknown parent): every path of `_stored` ran.
    assert stats.invalid_events == 3 and stats.orphans == 9 and stats.blocks_removed == 18
