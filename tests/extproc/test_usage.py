"""UsageReader: usage found in SSE or JSON response bodies however they are chunked."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from envoy_extproc.usage import UsageReader

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
SSE = (
    "".join(
        f'data: {{"choices":[{{"delta":{{"content":"t{i}"}}}}],"usage":null}}\n\n' for i in range(5)
    )
    + f'data: {{"choices":[],"usage":{json.dumps(USAGE)}}}\n\n'
    + "data: [DONE]\n\n"
).encode()


def feed_all(reader: UsageReader, body: bytes, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if 0 < c < len(body)})
    starts = [0, *points]
    ends = [*points, len(body)]
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        reader.feed(body[a:b], i == len(starts) - 1)


@given(st.lists(st.integers(min_value=0, max_value=len(SSE)), max_size=12))
def test_sse_usage_is_found_whatever_the_chunking(cuts: list[int]) -> None:
    reader = UsageReader("text/event-stream; charset=utf-8")
    feed_all(reader, SSE, cuts)
    assert reader.usage == USAGE


def test_sse_with_continuous_usage_keeps_the_last_one() -> None:
    body = b"".join(
        f'data: {{"usage":{{"prompt_tokens":3,"completion_tokens":{i}}}}}\n\n'.encode()
        for i in range(1, 4)
    )
    reader = UsageReader("text/event-stream")
    reader.feed(body, True)
    assert reader.usage == {"prompt_tokens": 3, "completion_tokens": 3}


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_json_usage_is_read_at_the_end(cuts: list[int]) -> None:
    body = json.dumps({"choices": [{"text": "x" * 100}], "usage": USAGE}).encode()
    reader = UsageReader("application/json")
    feed_all(reader, body, cuts)
    assert reader.usage == USAGE


def test_body_without_usage_or_not_json_leaves_usage_unknown() -> None:
    for ctype, body in [
        ("application/json", b'{"choices": []}'),
        ("application/json", b"<html>bad gateway</html>"),
        ("text/event-stream", b'data: {not json, "usage"}\n\ndata: [DONE]\n\n'),
    ]:
        reader = UsageReader(ctype)
        reader.feed(body, True)
        assert reader.usage is None


def test_json_body_over_the_cap_is_not_parsed() -> None:
    body = json.dumps({"pad": "x" * 500, "usage": USAGE}).encode()
    reader = UsageReader("application/json", json_cap_bytes=100)
    reader.feed(body[:300], False)
    reader.feed(body[300:], True)
    assert reader.usage is None
