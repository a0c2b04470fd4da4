"""parse_request: OpenAI bodies → RoutingRequest, every refusal, and chat rendering."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.request import (
    ChatTemplate,
    RequestError,
    RequestSettings,
    RoutingRequest,
    parse_request,
    render_plain,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# A Llama-3-style template (BOS on the first message, header/eot tokens, trimmed content),
# plus a role check so raise_exception is exercised.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def write_tokenizer_config(directory: Path, template: Any = LLAMA3_TEMPLATE, **extra: Any) -> Path:
    config = {
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "__type": "AddedToken"},
        "eos_token": "<|eot_id|>",
        "chat_template": template,
        **extra,
    }
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def llama3(tmp_path: Path) -> ChatTemplate:
    return ChatTemplate.from_tokenizer_config(write_tokenizer_config(tmp_path))


def chat_body(messages: list[Any], **fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": messages, **fields}).encode()


def refusal(raw: Any, path: str = CHAT, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(raw, path, **kwargs)
    return info.value


# ----------------------------------------------------------------------------- refusals
def test_bad_json_is_400_naming_the_problem_and_position() -> None:
    err = refusal(b'{"model": "m",}')
    assert err.status == 400
    assert err.code == "invalid_json"
    assert err.message == "body is not valid JSON: trailing comma in object (byte 14)"


def test_truncated_json_is_400_saying_where_it_ends() -> None:
    err = refusal(b'{"model": "m", "messages": [')
    assert err.status == 400
    assert err.message == "body is not valid JSON: Expecting value (char 28)"


def test_unpaired_surrogate_is_400_not_a_crash() -> None:
    escaped = refusal(b'{"model": "m", "prompt": "\\ud800"}', COMPLETIONS)
    assert escaped.status == 400 and "surrogate" in escaped.message
    raw = refusal('{"model": "m", "prompt": "\ud800"}', COMPLETIONS)
    assert raw.status == 400 and raw.message.startswith("body is not valid UTF-8 text")


def test_invalid_utf8_is_400() -> None:
    err = refusal(b'{"model": "m", "prompt": "\xff"}', COMPLETIONS)
    assert err.status == 400 and err.message.startswith("body is not valid UTF-8 text")


def test_empty_body_is_400() -> None:
    err = refusal(b"")
    assert err.status == 400 and "empty" in err.message


@pytest.mark.parametrize(
    ("raw", "what"),
    [(b"[]", "an array"), (b'"x"', "a string"), (b"3", "a number"), (b"null", "null")],
)
def test_valid_json_that_is_not_an_object_is_400(raw: bytes, what: str) -> None:
    err = refusal(raw)
    assert err.status == 400
    assert err.message == f"body must be a JSON object, not {what}"


def test_missing_model_is_400_naming_model() -> None:
    err = refusal(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert err.status == 400 and err.message == "'model' is required"
    assert err.code == "missing_field"


@pytest.mark.parametrize("model", [3, "", ["m"]])
def test_ill_typed_model_is_400(model: Any) -> None:
    err = refusal(json.dumps({"model": model, "prompt": "x"}), COMPLETIONS)
    assert err.status == 400 and err.message == "'model' must be a non-empty string"


def test_missing_messages_is_400() -> None:
    err = refusal(b'{"model": "m"}')
    assert err.status == 400 and err.message == "'messages' is required"


@pytest.mark.parametrize("messages", [[], "hi", {"role": "user"}])
def test_messages_not_a_non_empty_list_is_400(messages: Any) -> None:
    err = refusal(chat_body(messages))
    assert err.message == "'messages' must be a non-empty list of messages"


def test_missing_prompt_is_400() -> None:
    err = refusal(b'{"model": "m"}', COMPLETIONS)
    assert err.status == 400 and err.message == "'prompt' is required"


def test_ill_typed_content_is_400_naming_the_message() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "user", "content": 5},
    ]
    err = refusal(chat_body(messages))
    assert err.status == 400
    assert err.message == "'messages[2].content' must be a string or a list of content parts"


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ("text", "'messages[0].content[1]' must be an object with a string 'type'"),
        ({"text": "no type"}, "'messages[0].content[1]' must be an object with a string 'type'"),
        ({"type": "text", "text": 7}, "'messages[0].content[1].text' must be a string"),
        ({"type": "text"}, "'messages[0].content[1].text' must be a string"),
    ],
)
def test_ill_typed_content_part_is_400_naming_the_part(part: Any, message: str) -> None:
    content = [{"type": "text", "text": "ok"}, part]
    err = refusal(chat_body([{"role": "user", "content": content}]))
    assert err.status == 400 and err.message == message


def test_message_that_is_not_an_object_or_lacks_a_role_is_400() -> None:
    assert refusal(chat_body(["hi"])).message.startswith("'messages[0]' must be an object")
    err = refusal(chat_body([{"role": "user", "content": "a"}, {"content": "b"}]))
    assert err.message == "'messages[1].role' must be a string"


def test_ill_typed_tool_calls_and_tools_are_400() -> None:
    err = refusal(chat_body([{"role": "assistant", "content": None, "tool_calls": {}}]))
    assert err.message == "'messages[0].tool_calls' must be a list"
    err = refusal(chat_body([{"role": "user", "content": "x"}], tools={"a": 1}))
    assert err.message == "'tools' must be a list"


@pytest.mark.parametrize("value", [-1, "10", 1.5, True])
def test_max_tokens_not_a_non_negative_int_is_400(value: Any) -> None:
    err = refusal(json.dumps({"model": "m", "prompt": "x", "max_tokens": value}), COMPLETIONS)
    assert err.status == 400
    assert err.message.startswith("'max_tokens' must be a non-negative integer")


def test_bad_max_completion_tokens_is_400_naming_it() -> None:
    err = refusal(chat_body([{"role": "user", "content": "x"}], max_completion_tokens=-3))
    assert err.message.startswith("'max_completion_tokens' must be a non-negative integer")


@pytest.mark.parametrize("value", ["true", 1, [True]])
def test_stream_not_a_boolean_is_400(value: Any) -> None:
    err = refusal(json.dumps({"model": "m", "prompt": "x", "stream": value}), COMPLETIONS)
    assert err.status == 400 and err.message == "'stream' must be a boolean"


def test_body_over_the_limit_is_413_before_parsing() -> None:
    limits = RequestSettings(max_body_bytes=100)
    big = b'{"model": "m", "prompt": "' + b"x" * 200 + b'"}'
    err = refusal(big, COMPLETIONS, settings=limits)
    assert err.status == 413 and err.code == "body_too_large"
    # Not even valid JSON: the size check comes first.
    assert refusal(b"{" * 101, COMPLETIONS, settings=limits).status == 413


def test_str_body_over_the_limit_counts_utf8_bytes() -> None:
    limits = RequestSettings(max_body_bytes=100)
    body = json.dumps({"model": "m", "prompt": "é" * 40}, ensure_ascii=False)
    assert len(body) < 100 < len(body.encode())
    assert refusal(body, COMPLETIONS, settings=limits).status == 413
    ok = json.dumps({"model": "m", "prompt": "é" * 10}, ensure_ascii=False)
    assert parse_request(ok, COMPLETIONS, settings=limits).prompt == "é" * 10


@pytest.mark.parametrize(
    "path", ["/v1/embeddings", "/v1/models", "/v2/completions", "/v1/chat", "/", ""]
)
def test_unknown_path_is_404(path: str) -> None:
    err = refusal(b'{"model": "m", "prompt": "x"}', path)
    assert err.status == 404 and err.code == "unknown_path"
    assert err.to_json()["error"]["type"] == "not_found_error"


def test_unknown_path_is_404_even_with_a_bad_body() -> None:
    assert refusal(b"not json", "/v1/embeddings").status == 404


def test_bad_priority_header_is_400_naming_the_header() -> None:
    err = refusal(
        b'{"model": "m", "prompt": "x"}', COMPLETIONS, headers={"X-KVRoute-Priority": "urgent"}
    )
    assert err.status == 400 and "'x-kvroute-priority'" in err.message


@pytest.mark.parametrize("value", ["1", 1.5, True])
def test_bad_body_priority_is_400(value: Any) -> None:
    err = refusal(json.dumps({"model": "m", "prompt": "x", "priority": value}), COMPLETIONS)
    assert err.message.startswith("'priority' must be an integer")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "'prompt' must be a string, a list of strings, or a list of token ids"),
        (3, "'prompt' must be a string, a list of strings, or a list of token ids"),
        ([1, -2], "'prompt' must hold token ids"),
        ([1, 2**32], "'prompt' must hold token ids"),
        ([1, "a"], "'prompt' must hold token ids"),
        ([1, True], "'prompt' must hold token ids"),
        (["a", 1], "'prompt[1]' must be a string like prompt[0]"),
        ([[1], "a"], "'prompt[1]' must be a list of token ids like prompt[0]"),
        ([[], [1]], "'prompt[0]' must not be an empty list of token ids"),
        ([[1, 2.5]], "'prompt[0]' must hold token ids"),
    ],
)
def test_ill_formed_completions_prompt_is_400(prompt: Any, message: str) -> None:
    err = refusal(json.dumps({"model": "m", "prompt": prompt}), COMPLETIONS)
    assert err.status == 400 and err.message.startswith(message)


def test_user_that_is_not_a_string_is_400() -> None:
    err = refusal(json.dumps({"model": "m", "prompt": "x", "user": 5}), COMPLETIONS)
    assert err.message == "'user' must be a string"


def test_chat_template_raise_exception_is_400(llama3: ChatTemplate) -> None:
    err = refusal(chat_body([{"role": "wizard", "content": "x"}]), chat_template=llama3)
    assert err.status == 400 and "unknown role: wizard" in err.message


def test_chat_template_type_error_is_400_not_a_crash(tmp_path: Path) -> None:
    template = ChatTemplate("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}")
    err = refusal(chat_body([{"role": "user", "content": "x"}]), chat_template=template)
    assert err.status == 400 and "chat template failed" in err.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**33) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
field_names = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "user",
        "priority",
        "tools",
        "add_generation_prompt",
        "chat_template_kwargs",
    ]
)
messages_like = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", 3]), "content": json_values}
    ),
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(
    fields=st.dictionaries(field_names, json_values, max_size=6),
    messages=messages_like | json_values,
    path=st.sampled_from([CHAT, COMPLETIONS]),
)
def test_any_json_body_parses_or_raises_request_error(
    fields: dict[str, Any], messages: Any, path: str
) -> None:
    body = {"model": "m", **fields, "messages": messages}
    raw = json.dumps(body).encode()
    try:
        req = parse_request(raw, path)
    except RequestError as e:
        assert e.status == 400
        assert e.message
    else:
        assert "".join(req.segments) == req.prompt


@settings(max_examples=150, deadline=None)
@given(
    raw=st.binary(max_size=40)
    | st.text(max_size=40)
    | st.builds(lambda b: b'{"model": "m", "prompt": ' + b, st.binary(max_size=20)),
    path=st.sampled_from([CHAT, COMPLETIONS]),
)
def test_any_bytes_or_text_parse_or_raise_request_error(raw: bytes | str, path: str) -> None:
    try:
        parse_request(raw, path)
    except RequestError as e:
        assert e.status == 400 and e.message


# ------------------------------------------------------------------------- completions
def test_completions_string_prompt() -> None:
    req = parse_request(
        b'{"model": "m", "prompt": "hello", "max_tokens": 7, "stream": true}', COMPLETIONS
    )
    assert req.kind == "completions"
    assert (req.model, req.prompt, req.segments) == ("m", "hello", ("hello",))
    assert req.max_tokens == 7 and req.stream is True
    assert req.token_ids is None and req.batch_size == 1


def test_completions_list_of_one_string_is_that_string() -> None:
    req = parse_request(b'{"model": "m", "prompt": ["hello"]}', COMPLETIONS)
    assert req.prompt == "hello" and req.batch_size == 1


def test_completions_batch_of_strings_routes_on_the_first() -> None:
    req = parse_request(b'{"model": "m", "prompt": ["first", "second", "third"]}', COMPLETIONS)
    assert req.prompt == "first" and req.batch_size == 3


def test_completions_token_ids_prompt() -> None:
    req = parse_request(b'{"model": "m", "prompt": [5, 6, 7]}', COMPLETIONS)
    assert req.token_ids == [5, 6, 7]
    assert req.prompt == "" and req.segments == ()
    assert req.token_count == 3


def test_completions_batch_of_token_lists_routes_on_the_first() -> None:
    req = parse_request(b'{"model": "m", "prompt": [[1, 2], [3, 4, 5]]}', COMPLETIONS)
    assert req.token_ids == [1, 2] and req.batch_size == 2


def test_stream_and_max_tokens_default_when_absent_or_null() -> None:
    req = parse_request(
        b'{"model": "m", "prompt": "x", "stream": null, "max_tokens": null}', COMPLETIONS
    )
    assert req.stream is False and req.max_tokens is None


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/completions", "completions"),
        ("/completions", "completions"),
        ("/v1/completions?api-version=2", "completions"),
        ("/v1/chat/completions", "chat"),
        ("/chat/completions", "chat"),
        ("/v1/chat/completions/", "chat"),
        ("chat/completions?x=1&y=2", "chat"),
    ],
)
def test_paths_with_or_without_v1_and_query_are_accepted(path: str, kind: str) -> None:
    body = {"model": "m", "prompt": "p", "messages": [{"role": "user", "content": "c"}]}
    assert parse_request(body, path).kind == kind


def test_dict_body_is_used_as_is_and_kept_on_the_request() -> None:
    body = {"model": "m", "prompt": "x"}
    req = parse_request(body, COMPLETIONS, now=12.5)
    assert req.body is body and req.arrival == 12.5


def test_request_id_comes_from_the_header_or_is_generated() -> None:
    raw = b'{"model": "m", "prompt": "x"}'
    assert parse_request(raw, COMPLETIONS, {"X-Request-ID": "abc"}).request_id == "abc"
    a = parse_request(raw, COMPLETIONS).request_id
    b = parse_request(raw, COMPLETIONS).request_id
    assert re.fullmatch(r"[0-9a-f]{32}", a) and a != b


def test_custom_header_names_from_settings() -> None:
    custom = RequestSettings(
        session_header="X-Conversation", request_id_header="x-trace", priority_header="x-prio"
    )
    req = parse_request(
        b'{"model": "m", "prompt": "x"}',
        COMPLETIONS,
        {"x-conversation": "c1", "X-Trace": "t1", "X-PRIO": "sheddable"},
        settings=custom,
    )
    assert (req.session_key, req.request_id, req.priority) == ("c1", "t1", -1)


# ------------------------------------------------------------------------ session, LoRA
def test_session_key_header_wins_over_user() -> None:
    raw = b'{"model": "m", "prompt": "x", "user": "alice"}'
    assert parse_request(raw, COMPLETIONS, {"X-Session-Id": "s1"}).session_key == "s1"


def test_session_key_falls_back_to_user_then_none() -> None:
    assert (
        parse_request(b'{"model": "m", "prompt": "x", "user": "alice"}', COMPLETIONS).session_key
        == "alice"
    )
    assert parse_request(b'{"model": "m", "prompt": "x"}', COMPLETIONS).session_key is None
    empty_header = parse_request(
        b'{"model": "m", "prompt": "x", "user": "bob"}', COMPLETIONS, {"x-session-id": ""}
    )
    assert empty_header.session_key == "bob"


def test_lora_adapter_is_the_model_when_it_names_an_adapter() -> None:
    adapters = frozenset({"sql-lora"})
    req = parse_request(b'{"model": "sql-lora", "prompt": "x"}', COMPLETIONS, adapters=adapters)
    assert req.lora_adapter == "sql-lora"
    base = parse_request(b'{"model": "base", "prompt": "x"}', COMPLETIONS, adapters=adapters)
    assert base.lora_adapter is None


# ------------------------------------------------------------------------------ priority
@pytest.mark.parametrize(
    ("value", "priority"),
    [("sheddable", -1), ("Sheddable", -1), ("standard", 0), ("critical", 1), ("5", 5), ("-3", -3)],
)
def test_priority_header(value: str, priority: int) -> None:
    req = parse_request(
        b'{"model": "m", "prompt": "x"}', COMPLETIONS, {"X-KVRoute-Priority": value}
    )
    assert req.priority == priority
    assert req.sheddable is (priority < 0)


def test_body_priority_uses_vllms_lower_is_sooner_convention() -> None:
    later = parse_request(b'{"model": "m", "prompt": "x", "priority": 3}', COMPLETIONS)
    sooner = parse_request(b'{"model": "m", "prompt": "x", "priority": -2}', COMPLETIONS)
    assert later.priority == -3 and later.sheddable
    assert sooner.priority == 2 and not sooner.sheddable


def test_priority_header_wins_over_body_priority() -> None:
    req = parse_request(
        b'{"model": "m", "prompt": "x", "priority": 9}',
        COMPLETIONS,
        {"x-kvroute-priority": "2"},
    )
    assert req.priority == 2


# ---------------------------------------------------------------------------------- chat
def test_chat_without_template_uses_the_plain_rendering() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    req = parse_request(chat_body(messages, max_tokens=9), CHAT)
    assert req.kind == "chat" and req.max_tokens == 9
    assert req.segments == ("<|system|>\nbe brief\n", "<|user|>\nhi\n", "<|assistant|>\n")
    assert req.prompt == "".join(req.segments)


def test_chat_max_completion_tokens_wins_over_max_tokens() -> None:
    body = chat_body([{"role": "user", "content": "x"}], max_tokens=5, max_completion_tokens=8)
    assert parse_request(body, CHAT).max_tokens == 8


def test_chat_with_llama3_template_renders_like_the_engine(llama3: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "You are terse. "},
        {"role": "user", "content": "  What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    req = parse_request(chat_body(messages), CHAT, chat_template=llama3)
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    assert req.segments == expected
    assert req.prompt == "".join(expected)


def test_chat_segments_of_a_turn_prefix_the_next_turn(llama3: ChatTemplate) -> None:
    turn1 = [{"role": "user", "content": "hello"}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "bye"},
    ]
    for template in (llama3, None):
        a = parse_request(chat_body(turn1), CHAT, chat_template=template)
        b = parse_request(chat_body(turn2), CHAT, chat_template=template)
        assert b.segments[: len(a.segments) - 1] == a.segments[:-1]
        assert a.segments[-1] == b.segments[-1]  # the generation prompt


def test_add_generation_prompt_false_drops_the_last_segment(llama3: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    req = parse_request(
        chat_body(messages, add_generation_prompt=False), CHAT, chat_template=llama3
    )
    assert len(req.segments) == 2
    assert req.prompt.endswith("b<|eot_id|>")


def test_template_whose_partial_renderings_are_not_prefixes_loses_those_cuts() -> None:
    # Numbers every message with the conversation length: only the full rendering of all
    # messages is a prefix of the prompt, so the only cut left is before the generation prompt.
    template = ChatTemplate(
        "{% for m in messages %}[{{ messages | length }}:{{ m['content'] }}]{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    req = parse_request(chat_body(messages), CHAT, chat_template=template)
    assert req.prompt == "[2:a][2:b]>"
    assert req.segments == ("[2:a][2:b]", ">")
    single = parse_request(
        chat_body(messages, add_generation_prompt=False), CHAT, chat_template=template
    )
    assert single.segments == ("[2:a][2:b]",)


def test_template_that_refuses_partial_conversations_still_renders() -> None:
    template = ChatTemplate(
        "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('end on user') }}{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    req = parse_request(chat_body(messages), CHAT, chat_template=template)
    assert req.prompt == "<user>a<assistant>b<user>c"
    assert req.segments == ("<user>a", "<assistant>b<user>c")


def test_template_kwargs_and_tools_reach_the_template() -> None:
    template = ChatTemplate(
        "{% if tools %}T{{ tools | length }}{% endif %}{% if think %}!{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    body = chat_body(
        [{"role": "user", "content": "q"}],
        tools=[{"type": "function", "function": {"name": "f"}}],
        chat_template_kwargs={"think": True},
    )
    assert parse_request(body, CHAT, chat_template=template).prompt == "T1!q"
    bad = chat_body([{"role": "user", "content": "q"}], chat_template_kwargs=[1])
    assert (
        refusal(bad, chat_template=template).message == "'chat_template_kwargs' must be an object"
    )


def test_tool_calls_and_tool_messages_are_tolerated() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "sunny"},
    ]
    req = parse_request(chat_body(messages), CHAT)
    assert '"name":"f"' in req.segments[1]
    assert req.segments[2] == "<|tool|>\nsunny\n"
    other = [messages[0], {**messages[1], "tool_calls": [{**call, "id": "c2"}]}, messages[2]]
    assert parse_request(chat_body(other), CHAT).segments[1] != req.segments[1]


def test_text_parts_are_joined_with_newlines() -> None:
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_request(chat_body([{"role": "user", "content": content}]), CHAT)
    assert req.segments[0] == "<|user|>\na\nb\n"


def image_part(url: str, detail: str = "auto", reverse: bool = False) -> dict[str, Any]:
    inner = {"url": url, "detail": detail}
    if reverse:
        inner = dict(reversed(inner.items()))
        return {"image_url": inner, "type": "image_url"}
    return {"type": "image_url", "image_url": inner}


def test_image_parts_hash_stably_whatever_the_key_order() -> None:
    def prompt(part: dict[str, Any]) -> str:
        content = [{"type": "text", "text": "look"}, part]
        return parse_request(chat_body([{"role": "user", "content": content}]), CHAT).prompt

    a = prompt(image_part("data:image/png;base64,AAAA"))
    assert re.search(r"<\|image:[0-9a-f]{16}\|>", a)
    assert prompt(image_part("data:image/png;base64,AAAA", reverse=True)) == a
    assert prompt(image_part("data:image/png;base64,BBBB")) != a


def test_audio_and_unknown_parts_get_their_own_markers() -> None:
    content = [
        {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
        {"type": "hologram", "data": 1},
        {"type": "weird type!", "data": 2},
    ]
    req = parse_request(chat_body([{"role": "user", "content": content}]), CHAT)
    assert re.fullmatch(
        r"<\|user\|>\n<\|audio:[0-9a-f]{16}\|>\n<\|hologram:[0-9a-f]{16}\|>\n"
        r"<\|part:[0-9a-f]{16}\|>\n",
        req.segments[0],
    )


def test_image_marker_reaches_the_template(llama3: ChatTemplate) -> None:
    content = [{"type": "text", "text": "see"}, image_part("http://x/cat.png")]
    req = parse_request(
        chat_body([{"role": "user", "content": content}]), CHAT, chat_template=llama3
    )
    assert re.search(r"see\n<\|image:[0-9a-f]{16}\|><\|eot_id\|>", req.prompt)


def test_dict_body_with_unencodable_part_is_400() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "x", "o": object()}]}]}
    err = refusal(body)
    assert err.message.startswith("'messages[0].content[0]' is not JSON-encodable")


class CountingTemplate(ChatTemplate):
    """The real template, counting its renderings."""

    renders = 0

    def render(self, messages: Any, **kwargs: Any) -> str:
        self.renders += 1
        return super().render(messages, **kwargs)


def conversation(n: int) -> list[dict[str, str]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(n)
    ]


def test_next_turn_renders_only_its_new_messages() -> None:
    template = CountingTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    first = parse_request(chat_body(conversation(10)), CHAT, chat_template=template)
    assert template.renders == 11
    template.renders = 0
    second = parse_request(chat_body(conversation(12)), CHAT, chat_template=template)
    assert template.renders == 3  # the prompt and the two new message prefixes
    assert second.segments[:10] == first.segments[:10]
    fresh = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    assert (
        second.segments
        == parse_request(chat_body(conversation(12)), CHAT, chat_template=fresh).segments
    )


def test_remembered_cuts_are_checked_against_the_prompt() -> None:
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<A>")
    parse_request(chat_body(conversation(4)), CHAT, chat_template=template)
    template.bos_token = "<BB>"  # every remembered rendering is now stale
    req = parse_request(chat_body(conversation(4)), CHAT, chat_template=template)
    assert req.prompt.startswith("<BB>")
    assert len(req.segments) == 5 and req.segments[0].endswith("message 0<|eot_id|>")


def test_refused_prefixes_are_remembered_as_no_cut() -> None:
    template = CountingTemplate(
        "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('end on user') }}{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    body = chat_body(conversation(3))
    first = parse_request(body, CHAT, chat_template=template)
    template.renders = 0
    assert parse_request(body, CHAT, chat_template=template).segments == first.segments
    assert template.renders == 1


def test_cut_cache_smaller_than_the_conversation_still_cuts_every_message() -> None:
    template = CountingTemplate(LLAMA3_TEMPLATE, cut_cache_entries=2)
    first = parse_request(chat_body(conversation(6)), CHAT, chat_template=template)
    template.renders = 0
    again = parse_request(chat_body(conversation(6)), CHAT, chat_template=template)
    assert template.renders == 7  # a walk over 6 prefixes evicts each before it is reused
    assert again.segments == first.segments and len(again.segments) == 7


# ------------------------------------------------------------------ template loading forms
def test_template_from_a_model_directory_with_a_jinja_sidecar(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    template = ChatTemplate.from_tokenizer_config(tmp_path)
    assert template.render([{"role": "user", "content": "x"}]) == "<s>x"


def test_template_config_without_any_template_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="no chat_template"):
        ChatTemplate.from_tokenizer_config(path)


def test_template_that_does_not_compile_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": "D{% for m in messages %}{{ m['content'] }}{% endfor %}"},
        {"name": "tool_use", "template": "T{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    ]
    template = ChatTemplate.from_tokenizer_config(write_tokenizer_config(tmp_path, named))
    plain = chat_body([{"role": "user", "content": "q"}])
    with_tools = chat_body([{"role": "user", "content": "q"}], tools=[{"type": "function"}])
    assert parse_request(plain, CHAT, chat_template=template).prompt == "Dq"
    assert parse_request(with_tools, CHAT, chat_template=template).prompt == "Tq"


def test_generation_block_and_tojson_and_loop_controls_render() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
    )
    messages = [{"role": "user", "content": c} for c in ("é", "b", "c")]
    assert template.render(messages) == '"é""b"'


# ----------------------------------------------------------------- segments join property
chat_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool"]),
            "content": st.text(max_size=20)
            | st.none()
            | st.lists(
                st.sampled_from(
                    [
                        {"type": "text", "text": "t"},
                        {"type": "text", "text": " spaced \n"},
                        {"type": "image_url", "image_url": {"url": "u1"}},
                        {"type": "input_audio", "input_audio": {"data": "a"}},
                    ]
                ),
                max_size=3,
            ),
        }
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(messages=chat_messages, add_gen=st.booleans(), templated=st.booleans())
def test_segments_always_join_to_the_prompt(
    messages: list[dict[str, Any]], add_gen: bool, templated: bool
) -> None:
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>") if templated else None
    req = parse_request(
        chat_body(messages, add_generation_prompt=add_gen), CHAT, chat_template=template
    )
    assert "".join(req.segments) == req.prompt
    assert all(req.segments)
    if template is not None:
        # One segment per message (+ the generation prompt): every cut is a message end.
        assert len(req.segments) == len(messages) + int(add_gen)


def test_render_plain_is_the_documented_format() -> None:
    prompt, segments = render_plain(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tools=[{"b": 1, "a": 2}]
    )
    assert segments == ('<|tools|>\n[{"a":2,"b":1}]\n', "<|user|>\nx\n", "<|assistant|>\n")
    assert prompt == "".join(segments)


def test_routing_request_defaults_are_unchanged() -> None:
    req = RoutingRequest(model="m", prompt="p")
    assert (req.kind, req.priority, req.block_keys, req.batch_size) == ("completions", 0, None, 1)


def test_deeply_nested_json_is_400() -> None:
    body = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = refusal(body, COMPLETIONS)
    assert err.status == 400 and "nested too deeply" in err.message
