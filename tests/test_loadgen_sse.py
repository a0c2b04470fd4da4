"""The load generator's SSE line splitter: any chunking of a body gives the same lines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hypothesis import given
from hypothesis import strategies as st

from router.loadgen import sse_lines

_line = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40
)


async def _chunks(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in sorted(set(cuts)):
        yield body[start:cut]
        start = cut
    yield body[start:]


async def _collect(body: bytes, cuts: list[int]) -> list[str]:
    return [line async for line in sse_lines(_chunks(body, cuts))]


@given(
    lines=st.lists(_line, max_size=12),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_lines_survive_any_chunking(lines: list[str], crlf: bool, cuts: list[int]) -> None:
    sep = "\r\n" if crlf else "\n"
    body = "".join(line + sep for line in lines).encode()
    cuts = [c for c in cuts if c <= len(body)]
    assert asyncio.run(_collect(body, cuts)) == lines


def test_a_last_line_without_newline_and_a_long_line_are_kept() -> None:
    long = "data: " + "x" * 300_000
    body = f"data: a\n\n{long}\ndata: [DONE]".encode()
    assert asyncio.run(_collect(body, [3, 70_000])) == ["data: a", "", long, "data: [DONE]"]
