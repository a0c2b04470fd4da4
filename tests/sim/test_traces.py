"""Mooncake trace replay: parsing, bad lines, deterministic shared blocks, time scaling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.blocks import token_block_keys
from router.sim.traces import (
    TraceError,
    block_token_ids,
    read_mooncake,
    reusable_fraction,
    trace_workload,
)

# The shared data folder sits beside the repository (../shared), in sessions and in CI.
MOONCAKE = Path(__file__).resolve().parents[3] / "shared/data/mooncake/conversation_trace.jsonl"


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _rec(ts: float, n_in: int, n_out: int, ids: list[int]) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}
    )


def test_equal_hash_ids_give_equal_token_blocks_and_shared_prefix(tmp_path: Path) -> None:
    p = _write(tmp_path, [_rec(0, 1100, 10, [1, 2, 3]), _rec(500, 700, 5, [1, 4])])
    w = trace_workload(p)
    a, b = w.arrivals
    assert a.prompt_len == 1100 and b.prompt_len == 700
    assert np.array_equal(a.token_ids[:512], b.token_ids[:512])
    assert not np.array_equal(a.token_ids[512:700], b.token_ids[512:700])
    ka = token_block_keys(a.token_ids, 16)
    kb = token_block_keys(b.token_ids, 16)
    shared = next(i for i, (x, y) in enumerate(zip(ka, kb, strict=False)) if x != y)
    assert shared == 32  # 512 tokens / 16


def test_block_content_depends_on_id_and_seed_not_position() -> None:
    x = block_token_ids([7, 9], 1024)
    y = block_token_ids([9], 512)
    assert np.array_equal(x[512:], y)
    assert not np.array_equal(block_token_ids([9], 512, seed=1), y)
    assert x.dtype == np.uint32 and int(x.max()) < 128_000


def test_speedup_and_limit(tmp_path: Path) -> None:
    lines = [_rec(1000 * i + 2000, 512, 4, [i]) for i in range(10)]
    w = trace_workload(_write(tmp_path, lines), speedup=4.0, limit=5)
    assert len(w.arrivals) == 5
    assert [a.time_s for a in w.arrivals] == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids"),
        ('{"timestamp": 0, "input_length": "x", "output_length": 1, "hash_ids": [1]}', "int"),
        (_rec(0, 1200, 1, [1, 2]), "needs 3 hash_ids"),
        (_rec(0, 0, 1, []), "input_length must be >= 1"),
        (_rec(-5, 10, 1, [1]), "negative"),
        ("[1, 2, 3]", "bad record"),
    ],
)
def test_bad_line_names_its_line_number(tmp_path: Path, bad: str, reason: str) -> None:
    p = _write(tmp_path, [_rec(0, 10, 1, [1]), "", bad, _rec(1, 10, 1, [2])])
    with pytest.raises(TraceError, match=reason) as exc:
        read_mooncake(p)
    assert exc.value.line_no == 3
    assert str(exc.value).startswith(f"{p}:3:")
    assert isinstance(exc.value, ValueError)


def test_limit_stops_before_a_later_bad_line(tmp_path: Path) -> None:
    p = _write(tmp_path, [_rec(0, 10, 1, [1]), "garbage"])
    assert len(read_mooncake(p, limit=1)) == 1


def test_empty_trace_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no records"):
        trace_workload(_write(tmp_path, [""]))


@pytest.mark.skipif(not MOONCAKE.exists(), reason="Mooncake trace not present")
def test_mooncake_conversation_trace_reusable_share_is_37_4_percent() -> None:
    records = read_mooncake(MOONCAKE)
    assert len(records) == 12_031
    assert reusable_fraction(records) == pytest.approx(0.374, abs=0.0005)


@pytest.mark.skipif(not MOONCAKE.exists(), reason="Mooncake trace not present")
def test_replayed_tokens_reproduce_the_traces_prefix_sharing() -> None:
    """An infinite cache over 16-token block keys of the synthetic tokens reuses what the hash
    ids say is reusable, up to the rounding of partial last blocks to 16-token blocks."""
    n = 1500
    records = read_mooncake(MOONCAKE, limit=n)
    expected = reusable_fraction(records)
    w = trace_workload(MOONCAKE, limit=n)
    seen: set[int] = set()
    reused = total = 0
    for a in w.arrivals:
        keys = token_block_keys(a.token_ids, 16)
        total += a.prompt_len
        for k in keys:
            if k not in seen:
                break
            reused += 16
        seen.update(keys)
    measured = reused / total
    assert expected > 0.05
    assert measured == pytest.approx(expected, abs=0.005)
