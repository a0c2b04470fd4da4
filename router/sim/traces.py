"""Mooncake JSONL traces → a `Workload`.

This module owns reading a Mooncake-format trace (one JSON object a line: `timestamp` in ms,
`input_length`, `output_length`, `hash_ids`, each id standing for a 512-token block, the last
possibly partial) and turning it into arrivals with real token ids.

Each hash id becomes a deterministic synthetic block of tokens computed from (seed, id)
alone, so two requests whose ids agree share exactly those tokens and hence (through the
chained block keys) exactly that prefix. The tokens of a block are a splitmix64 of
(seed, id, position) reduced mod the vocabulary: vectorized, no per-block generator state,
and no cache of blocks (a trace holds hundreds of thousands of distinct ids).
The last block is cut so the prompt has exactly `input_length` tokens.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from router.sim.workloads import Arrival, Workload

#: Tokens per Mooncake hash id.
MOONCAKE_BLOCK_TOKENS = 512

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class TraceError(ValueError):
    """A trace line that cannot be replayed; names the file and the 1-based line number."""

    def __init__(self, path: str, line_no: int, message: str) -> None:
        super().__init__(f"{path}:{line_no}: {message}")
        self.path = path
        self.line_no = line_no
        self.reason = message


class TraceRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int]


_decoder = msgspec.json.Decoder(TraceRecord)


def _check(rec: TraceRecord, block_tokens: int) -> str | None:
    if rec.timestamp < 0:
        return "timestamp is negative"
    if rec.input_length < 1:
        return "input_length must be >= 1"
    if rec.output_length < 1:
        return "output_length must be >= 1"
    if any(h < 0 for h in rec.hash_ids):
        return "hash_ids must be non-negative"
    need = -(-rec.input_length // block_tokens)
    if len(rec.hash_ids) != need:
        return (
            f"input_length {rec.input_length} needs {need} hash_ids of {block_tokens} tokens, "
            f"got {len(rec.hash_ids)}"
        )
    return None


def read_mooncake(
    path: str | Path, limit: int | None = None, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> list[TraceRecord]:
    """Parse the first `limit` records (all when None); blank lines are skipped.

    Raises `TraceError` with the line number for malformed JSON, missing or mistyped fields,
    or a `hash_ids` list that does not cover `input_length`.
    """
    name = str(path)
    out: list[TraceRecord] = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = _decoder.decode(line)
            except msgspec.ValidationError as e:
                raise TraceError(name, line_no, f"bad record: {e}") from None
            except msgspec.DecodeError as e:
                raise TraceError(name, line_no, f"not valid JSON: {e}") from None
            problem = _check(rec, block_tokens)
            if problem:
                raise TraceError(name, line_no, problem)
            out.append(rec)
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def block_token_ids(
    hash_ids: list[int] | np.ndarray,
    length: int,
    seed: int = 0,
    vocab_size: int = 128_000,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
) -> np.ndarray:
    """Tokens of the blocks `hash_ids`, concatenated and cut to `length` (uint32).

    Block content depends only on (seed, id), never on the block's position or request.
    """
    ids = np.asarray(hash_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix64(ids ^ _splitmix64(np.array([seed], dtype=np.uint64)))
        pos = np.arange(block_tokens, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        mixed = _splitmix64(base[:, None] + pos[None, :]).reshape(-1)[:length]
    return (mixed % np.uint64(vocab_size)).astype(np.uint32)


def trace_workload(
    path: str | Path,
    *,
    speedup: float = 1.0,
    limit: int | None = None,
    seed: int = 0,
    vocab_size: int = 128_000,
    concurrency: int | None = None,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
) -> Workload:
    """Replay a Mooncake trace: arrival times are `timestamp / 1000 / speedup` seconds."""
    if speedup <= 0:
        raise ValueError("speedup must be > 0")
    records = read_mooncake(path, limit, block_tokens)
    if not records:
        raise TraceError(str(path), 0, "trace has no records")
    t0 = records[0].timestamp
    arrivals = []
    for i, rec in enumerate(records):
        tokens = block_token_ids(rec.hash_ids, rec.input_length, seed, vocab_size, block_tokens)
        t = (rec.timestamp - t0) / 1000.0 / speedup
        arrivals.append(Arrival(i, t, f"t{i}", tokens, rec.output_length))
    name = Path(path).stem
    desc = f"Mooncake trace {Path(path).name}, {len(records)} requests, speedup {speedup:g}"
    return Workload(name, arrivals, concurrency, desc)


def reusable_fraction(
    records: list[TraceRecord], block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> float:
    """Token-weighted share of input an infinite prefix cache could serve, from the hash ids:
    each request's leading run of blocks whose whole prefix was seen before."""
    nodes: dict[tuple[int, int], int] = {}  # (parent node, hash id) -> node
    reusable = total = 0
    for rec in records:
        total += rec.input_length
        parent = -1
        leading = True
        for i, h in enumerate(rec.hash_ids):
            node = nodes.get((parent, h))
            if node is None:
                leading = False
                node = nodes[(parent, h)] = len(nodes)
            elif leading:
                reusable += min(block_tokens, rec.input_length - i * block_tokens)
            parent = node
    return reusable / total if total else 0.0
