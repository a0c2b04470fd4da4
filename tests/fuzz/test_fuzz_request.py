"""Fuzzing the OpenAI body parse (`router.request.parse_request`) and the scheduling behind it.

Whatever the bytes, the parse returns a `RoutingRequest` the scheduler can route, or raises
`RequestError` with a 4xx status and an OpenAI error body that encodes as JSON. Inputs: random
JSON values, request-shaped bodies whose fields take wrong types, huge and non-finite numbers,
deep nesting, odd Unicode (lone surrogates as escapes, as raw UTF-8-ish bytes and in str
bodies), tools and image/audio/file content parts; with and without the shipped chat template.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from router.config import parse_config
from router.request import ChatTemplate, RequestError, RoutingRequest, parse_request
from router.scheduler import Scheduler
from tests.fuzz.conftest import FUZZ, assert_no_crash_logged

MODEL = "m"
FLEET = "pods:\n" + "".join(
    f"  - {{endpoint: '127.0.0.1:{p}', models: [{MODEL}]}}\n" for p in (18001, 18002)
)
TOKENIZER = Path(__file__).resolve().parents[2] / "router" / "data" / "tokenizer" / "tokenizer.json"
TEMPLATE = ChatTemplate.beside_tokenizer(str(TOKENIZER))
PATHS = ("/v1/completions", "/v1/chat/completions")

# Text that stresses encoders: controls, non-BMP, combining marks, lone surrogates (Cs).
odd_text = st.text(
    alphabet=st.characters(codec=None, categories=("L", "M", "N", "P", "S", "Z", "C", "Cs")),
    max_size=40,
)
huge_int = st.integers(min_value=-(2**130), max_value=2**130)
#: A sane count most of the time, a huge or negative one otherwise.
count = st.one_of(st.integers(min_value=0, max_value=4096), huge_int)
token_id = st.one_of(st.integers(min_value=0, max_value=2**32 - 1), huge_int)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    huge_int,
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
)
json_value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(odd_text, inner, max_size=5)
    ),
    max_leaves=25,
)


def _maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field value: usually well-typed, sometimes any JSON value at all (one in five, so
    a fair share of bodies with several fields still parse)."""
    return st.integers(min_value=0, max_value=4).flatmap(lambda i: good if i else json_value)


image_part = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["image_url", "input_audio", "file", "video_url", "x-custom", ""]),
        "image_url": _maybe(st.fixed_dictionaries({"url": odd_text})),
    }
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": _maybe(odd_text)})
content = _maybe(
    st.one_of(odd_text, st.lists(_maybe(st.one_of(text_part, image_part)), max_size=4))
)
message = _maybe(
    st.fixed_dictionaries(
        {
            "role": _maybe(st.sampled_from(["system", "user", "assistant", "tool"])),
            "content": content,
        },
        optional={
            "tool_calls": _maybe(st.lists(json_value, max_size=2)),
            "name": _maybe(odd_text),
        },
    )
)
tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": _maybe(odd_text), "parameters": json_value}),
    }
)
common = {
    "stream": _maybe(st.booleans()),
    "max_tokens": _maybe(count),
    "priority": _maybe(count),
    "user": _maybe(odd_text),
    "kv_transfer_params": json_value,
}
chat_body = st.fixed_dictionaries(
    {
        "model": _maybe(st.just(MODEL)),
        "messages": _maybe(st.lists(message, min_size=1, max_size=4)),
    },
    optional={
        **common,
        "tools": _maybe(st.lists(tool, max_size=3)),
        "max_completion_tokens": _maybe(count),
        "add_generation_prompt": _maybe(st.booleans()),
        "chat_template_kwargs": _maybe(st.dictionaries(odd_text, json_value, max_size=3)),
    },
)
prompt = _maybe(
    st.one_of(
        odd_text,
        st.lists(odd_text, min_size=1, max_size=3),
        st.lists(token_id, max_size=8),
        st.lists(st.lists(token_id, max_size=5), max_size=3),
    )
)
completion_body = st.fixed_dictionaries(
    {"model": _maybe(st.just(MODEL)), "prompt": prompt}, optional=common
)


def _encodings(value: Any) -> list[bytes | str]:
    """The same value as the wire may carry it: ASCII-escaped JSON, raw UTF-8 with lone
    surrogates passed through (invalid UTF-8), and a Python str body."""
    ascii_json = json.dumps(value, allow_nan=True)
    raw = json.dumps(value, ensure_ascii=False, allow_nan=True)
    return [ascii_json.encode(), raw.encode("utf-8", "surrogatepass"), raw]


@pytest.fixture(scope="module")
def scheduler() -> Scheduler:
    return Scheduler(parse_config(FLEET), seed=1)


def check(raw: bytes | str, path: str, scheduler: Scheduler, template: ChatTemplate | None) -> None:
    """The property every body must satisfy: routed, or a clear 4xx in OpenAI's shape."""
    try:
        req = parse_request(raw, path, {"x-session-id": "s"}, chat_template=template)
    except RequestError as e:
        event(f"refused {e.status} {e.code}")
        assert 400 <= e.status < 500, (e.status, e.message)
        assert e.message
        body = msgspec.json.decode(msgspec.json.encode(e.to_json()))
        assert body["error"]["message"] == e.message
        return
    event("parsed")
    assert isinstance(req, RoutingRequest)
    # The body's own model string (usually MODEL; any other one is a 404 from the scheduler).
    assert isinstance(req.model, str) and req.model
    req.prompt.encode("utf-8")  # the engine receives it as UTF-8: no lone surrogate left
    try:
        decision = scheduler.schedule(req)
    except RequestError as e:  # e.g. a prompt too long for the fleet: still a clear answer
        assert 400 <= e.status < 600 and e.message
        return
    assert decision.target.startswith("127.0.0.1:")


@FUZZ
@given(value=json_value, path=st.sampled_from(PATHS))
def test_any_json_value_is_routed_or_a_clear_4xx(
    value: Any, path: str, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    for raw in _encodings(value):
        check(raw, path, scheduler, TEMPLATE)
    assert_no_crash_logged(caplog)


@settings(FUZZ, max_examples=60)  # each example renders the template several times
@given(body=chat_body, with_template=st.booleans())
@example(
    body={"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}, with_template=True
)
@example(
    body={
        "model": MODEL,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 1e400}}]}
        ],
    },
    with_template=False,
)
def test_chat_bodies_are_routed_or_a_clear_4xx(
    body: dict[str, Any],
    with_template: bool,
    scheduler: Scheduler,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for raw in _encodings(body):
        check(raw, "/v1/chat/completions", scheduler, TEMPLATE if with_template else None)
    assert_no_crash_logged(caplog)


@FUZZ
@given(body=completion_body)
@example(body={"model": MODEL, "prompt": [2**64, 1]})
@example(body={"model": MODEL, "prompt": "x", "max_tokens": 2**100, "priority": -(2**100)})
def test_completion_bodies_are_routed_or_a_clear_4xx(
    body: dict[str, Any], scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    for raw in _encodings(body):
        check(raw, "/v1/completions", scheduler, None)
    assert_no_crash_logged(caplog)


@FUZZ
@given(
    depth=st.integers(min_value=1, max_value=120_000),
    opener=st.sampled_from(["[", '{"a":']),
    where=st.sampled_from(["body", "messages", "prompt", "tools"]),
    path=st.sampled_from(PATHS),
)
@example(depth=100_000, opener="[", where="body", path="/v1/chat/completions")
@example(depth=100_000, opener='{"a":', where="tools", path="/v1/chat/completions")
def test_deep_nesting_is_a_clear_4xx_not_a_recursion_error(
    depth: int,
    opener: str,
    where: str,
    path: str,
    scheduler: Scheduler,
    caplog: pytest.LogCaptureFixture,
) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    if where == "body":
        raw = nested
    else:
        head = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x"}}]'
        raw = f'{head}, "{where}": {nested}}}'
    # Finalizers of other tests' objects must not run while this parse is deep in the stack:
    # one that did would hit the recursion limit itself and surface here as "unraisable".
    gc.collect()
    gc.disable()
    try:
        check(raw.encode(), path, scheduler, TEMPLATE)
    finally:
        gc.enable()
    assert_no_crash_logged(caplog)


@FUZZ
@given(raw=st.binary(max_size=300), path=st.sampled_from(PATHS))
@example(raw=b'{"model": "m", "prompt": "\xed\xa0\x80"}', path="/v1/completions")
@example(raw=b'{"model": "m", "prompt": "\\ud800"}', path="/v1/completions")
@example(raw=b"\xef\xbb\xbf{}", path="/v1/completions")
def test_arbitrary_bytes_are_a_clear_4xx(
    raw: bytes, path: str, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    check(raw, path, scheduler, TEMPLATE)
    assert_no_crash_logged(caplog)
