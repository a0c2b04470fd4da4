"""Block keys: chain properties, the prefix-caching tokenizer, and BlockKeyer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from router.blocks import (
    BlockConfig,
    BlockKeyer,
    PrefixTokenizer,
    char_block_keys,
    root_key,
    token_block_keys,
)
from router.request import ChatTemplate, RoutingRequest, parse_request

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
]
TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? fine, thanks!",
    "routing requests to the pod that already holds their prefix saves prefill time",
    "système: réponds en français. 数字 1234567890 — done.",
]


def build_tokenizer() -> Tokenizer:
    """A small byte-level BPE (Llama-3 style: no prefix space, BOS added by post-processing)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 10, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tok


TOKENIZER = build_tokenizer()
BOS = TOKENIZER.token_to_id("<|begin_of_text|>")
LLAMA3 = ChatTemplate(
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}",
    bos_token="<|begin_of_text|>",
)

token_lists = st.lists(st.integers(0, 2**32 - 1), max_size=120)
block_sizes = st.integers(1, 8)
seeds = st.integers(0, 2**64 - 1)
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
words = st.text(
    alphabet=st.sampled_from(list("abcdefghij XYZ,.?!'\n\té数1")), min_size=0, max_size=30
)


def chat(messages: list[dict[str, Any]], template: ChatTemplate | None = None) -> RoutingRequest:
    body = json.dumps({"model": "m", "messages": messages}).encode()
    return parse_request(body, "/v1/chat/completions", chat_template=template)


# ---------------------------------------------------------------- token key properties
@settings(max_examples=80, deadline=None)
@given(ids=token_lists, b=block_sizes, cut=st.integers(0, 120), seed=seeds)
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(
    ids: list[int], b: int, cut: int, seed: int
) -> None:
    full = token_block_keys(ids, b, seed)
    assert token_block_keys(ids[:cut], b, seed) == full[: min(cut, len(ids)) // b]


@settings(max_examples=80, deadline=None)
@given(shared=token_lists, a=token_lists, c=token_lists, b=block_sizes)
def test_equal_prefixes_give_equal_keys(
    shared: list[int], a: list[int], c: list[int], b: int
) -> None:
    n = len(shared) // b
    assert token_block_keys(shared + a, b)[:n] == token_block_keys(shared + c, b)[:n]


@settings(max_examples=80, deadline=None)
@given(ids=token_lists, b=block_sizes, data=st.data())
def test_one_token_change_in_block_j_changes_keys_from_j_on(
    ids: list[int], b: int, data: st.DataObject
) -> None:
    n = len(ids) // b
    assume(n >= 1)
    pos = data.draw(st.integers(0, n * b - 1))
    new = data.draw(st.integers(0, 2**32 - 1).filter(lambda t: t != ids[pos]))
    changed = [*ids[:pos], new, *ids[pos + 1 :]]
    before, after = token_block_keys(ids, b), token_block_keys(changed, b)
    j = pos // b
    assert before[:j] == after[:j]
    assert all(x != y for x, y in zip(before[j:], after[j:], strict=True))


@settings(max_examples=50, deadline=None)
@given(ids=token_lists, b=block_sizes)
def test_partial_last_block_is_not_keyed(ids: list[int], b: int) -> None:
    keys = token_block_keys(ids, b)
    assert len(keys) == len(ids) // b
    # Whatever follows the last full block does not change any key.
    assert token_block_keys([*ids[: len(keys) * b], 7, 7, 7][: len(keys) * b + b - 1], b) == keys


@settings(max_examples=80, deadline=None)
@given(ids=token_lists, b=block_sizes, seed=seeds, extra=st.none() | st.text(max_size=5))
def test_parent_continuation_equals_keying_the_whole(
    ids: list[int], b: int, seed: int, extra: str | None
) -> None:
    whole = token_block_keys(ids, b, seed, extra)
    for j in range(len(whole) + 1):
        parent = whole[j - 1] if j else root_key(seed, extra)
        tail = token_block_keys(ids[j * b :], b, seed, parent=parent)
        assert token_block_keys(ids[: j * b], b, seed, extra) + tail == whole


@settings(max_examples=50, deadline=None)
@given(ids=token_lists.filter(lambda x: len(x) >= 8), b=block_sizes, seed=seeds)
def test_lora_extra_changes_every_key(ids: list[int], b: int, seed: int) -> None:
    base = token_block_keys(ids, b, seed)
    lora_a = token_block_keys(ids, b, seed, extra="adapter-a")
    lora_b = token_block_keys(ids, b, seed, extra="adapter-b")
    for x, y, z in zip(base, lora_a, lora_b, strict=True):
        assert len({x, y, z}) == 3


def test_seed_changes_every_key_and_numpy_input_keys_like_a_list() -> None:
    ids = list(range(64))
    assert token_block_keys(np.array(ids, dtype=np.int64), 16) == token_block_keys(ids, 16)
    a, b = token_block_keys(ids, 16, seed=1), token_block_keys(ids, 16, seed=2)
    assert all(x != y for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------- char key properties
@settings(max_examples=80, deadline=None)
@given(text=texts, b=block_sizes, cut=st.integers(0, 200))
def test_char_keys_of_a_prefix_are_a_prefix_of_the_keys(text: str, b: int, cut: int) -> None:
    full = char_block_keys(text, b)
    assert char_block_keys(text[:cut], b) == full[: min(cut, len(text)) // b]
    assert len(full) == len(text) // b


@settings(max_examples=80, deadline=None)
@given(shared=texts, a=texts, c=texts, b=block_sizes)
def test_char_equal_prefixes_give_equal_keys(shared: str, a: str, c: str, b: int) -> None:
    n = len(shared) // b
    assert char_block_keys(shared + a, b)[:n] == char_block_keys(shared + c, b)[:n]


@settings(max_examples=80, deadline=None)
@given(text=texts, b=block_sizes, data=st.data())
def test_char_change_in_block_j_changes_keys_from_j_on(
    text: str, b: int, data: st.DataObject
) -> None:
    n = len(text) // b
    assume(n >= 1)
    pos = data.draw(st.integers(0, n * b - 1))
    new = data.draw(st.characters(codec="utf-8").filter(lambda ch: ch != text[pos]))
    before = char_block_keys(text, b)
    after = char_block_keys(text[:pos] + new + text[pos + 1 :], b)
    j = pos // b
    assert before[:j] == after[:j]
    assert all(x != y for x, y in zip(before[j:], after[j:], strict=True))


@settings(max_examples=50, deadline=None)
@given(text=texts.filter(lambda t: len(t) >= 8), b=block_sizes)
def test_char_lora_extra_changes_every_key(text: str, b: int) -> None:
    base = char_block_keys(text, b)
    lora = char_block_keys(text, b, extra="adapter")
    assert all(x != y for x, y in zip(base, lora, strict=True))


# -------------------------------------------------------------------- PrefixTokenizer
conversations = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": words}
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(messages=conversations, templated=st.booleans())
def test_prefix_tokenizer_equals_uncached_tokenization_of_chat_renderings(
    messages: list[dict[str, Any]], templated: bool
) -> None:
    tok = PrefixTokenizer(TOKENIZER)
    req = chat(messages, LLAMA3 if templated else None)
    expected = tok.encode_plain(req.prompt)
    assert tok.encode(req.segments) == expected
    assert tok.encode(req.segments) == expected  # now from the cache
    assert tok.hits == 1


@settings(max_examples=40, deadline=None)
@given(first=conversations, reply=words, follow_up=words, templated=st.booleans())
def test_prefix_tokenizer_hits_the_cache_on_the_next_turn(
    first: list[dict[str, Any]], reply: str, follow_up: str, templated: bool
) -> None:
    tok = PrefixTokenizer(TOKENIZER)
    template = LLAMA3 if templated else None
    tok.encode(chat(first, template).segments)
    assert (tok.hits, tok.misses) == (0, 1)
    turn2 = chat(
        [
            *first,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": follow_up},
        ],
        template,
    )
    assert tok.encode(turn2.segments) == tok.encode_plain(turn2.prompt)
    assert tok.hits == 1


def test_prefix_tokenizer_cache_is_bounded() -> None:
    tok = PrefixTokenizer(TOKENIZER, max_entries=4)  # two prompts' worth of boundaries
    for i in range(10):
        tok.encode((f"<|user|>\nmessage {i}\n", "<|assistant|>\n"))
    tok.encode(("<|user|>\nmessage 9\n", "<|assistant|>\n"))
    assert tok.hits == 1
    tok.encode(("<|user|>\nmessage 0\n", "<|assistant|>\n"))
    assert tok.hits == 1 and tok.misses == 11  # evicted long ago


def test_special_affixes_are_what_the_post_processor_adds() -> None:
    assert PrefixTokenizer(TOKENIZER).special_affixes() == ([BOS], [])
    plain = build_tokenizer()
    plain.post_processor = None  # type: ignore[assignment]
    assert PrefixTokenizer(plain).special_affixes() == ([], [])


def test_prefix_tokenizer_refuses_other_objects() -> None:
    with pytest.raises(TypeError):
        PrefixTokenizer(object())


# ------------------------------------------------------------------------- BlockKeyer
TOKEN_MODE = BlockConfig(mode="tokens", block_size=4, seed=11)
CHAR_MODE = BlockConfig(mode="chars", chars_per_block=8, block_size=4, seed=11)


def completions(prompt: Any, model: str = "m", adapters: frozenset[str] = frozenset()) -> Any:
    body = json.dumps({"model": model, "prompt": prompt}).encode()
    return parse_request(body, "/v1/completions", adapters=adapters)


def test_keyer_completions_prompt_gets_the_bos_vllm_adds() -> None:
    keyer = BlockKeyer(TOKEN_MODE, PrefixTokenizer(TOKENIZER))
    req = completions("the quick brown fox jumps over the lazy dog again and again")
    ids = [BOS, *TOKENIZER.encode(req.prompt, add_special_tokens=False).ids]
    assert ids == TOKENIZER.encode(req.prompt).ids
    assert keyer.keys(req) == token_block_keys(ids, 4, 11)
    assert keyer.token_count(req) == len(ids)


def test_keyer_chat_keys_the_rendering_without_an_added_bos() -> None:
    tok = PrefixTokenizer(TOKENIZER)
    keyer = BlockKeyer(TOKEN_MODE, tok)
    req = chat([{"role": "user", "content": "hello world, how are you today?"}], LLAMA3)
    ids = tok.encode_plain(req.prompt)
    assert ids[0] == BOS and ids[1] != BOS  # the template's own BOS, once
    assert keyer.keys(req) == token_block_keys(ids, 4, 11)
    assert keyer.token_count(req) == len(ids)


def test_keyer_keys_given_token_ids_directly() -> None:
    tok = PrefixTokenizer(TOKENIZER)
    keyer = BlockKeyer(TOKEN_MODE, tok)
    req = completions(list(range(10)))
    assert keyer.keys(req) == token_block_keys(list(range(10)), 4, 11)
    assert keyer.token_count(req) == 10
    assert tok.misses == tok.hits == 0  # never tokenized


def test_keyer_reuses_keys_already_on_the_request() -> None:
    tok = PrefixTokenizer(TOKENIZER)
    keyer = BlockKeyer(TOKEN_MODE, tok)
    req = completions("hello world")
    first = keyer.keys(req)
    assert req.block_keys is first
    assert keyer.keys(req) is first
    assert tok.misses == 1 and tok.hits == 0


def test_keyer_token_count_tokenizes_once_when_asked_first() -> None:
    tok = PrefixTokenizer(TOKENIZER)
    keyer = BlockKeyer(TOKEN_MODE, tok)
    req = completions("the lazy dog")
    n = keyer.token_count(req)
    assert n == len(TOKENIZER.encode("the lazy dog").ids)
    assert req.block_keys is not None
    assert keyer.token_count(req) == n and tok.misses == 1


def test_keyer_chars_mode_keys_the_prompt_text_and_estimates_tokens() -> None:
    keyer = BlockKeyer(CHAR_MODE)
    req = completions("x" * 30)
    assert keyer.keys(req) == char_block_keys("x" * 30, 8, 11)
    assert len(req.block_keys or []) == 3
    assert keyer.token_count(req) == 8  # ceil(30 / 4)


def test_keyer_chars_mode_keys_token_ids_when_there_is_no_text() -> None:
    keyer = BlockKeyer(CHAR_MODE)
    req = completions(list(range(9)))
    assert keyer.keys(req) == token_block_keys(list(range(9)), 4, 11)
    assert keyer.token_count(req) == 9


@pytest.mark.parametrize("config", [TOKEN_MODE, CHAR_MODE])
def test_keyer_lora_adapter_changes_every_key(config: BlockConfig) -> None:
    keyer = BlockKeyer(config, PrefixTokenizer(TOKENIZER))
    prompt = "routing requests to the pod that already holds their prefix saves prefill time"
    base = keyer.keys(completions(prompt, model="base", adapters=frozenset({"lora"})))
    lora = keyer.keys(completions(prompt, model="lora", adapters=frozenset({"lora"})))
    assert len(base) == len(lora) >= 2
    assert all(x != y for x, y in zip(base, lora, strict=True))


def test_keyer_token_mode_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="needs a tokenizer"):
        BlockKeyer(TOKEN_MODE)
    with pytest.raises(ValueError, match="tokenizer_path"):
        BlockKeyer.from_config(TOKEN_MODE)


def test_keyer_from_config_loads_a_tokenizer_file_or_directory(tmp_path: Path) -> None:
    TOKENIZER.save(str(tmp_path / "tokenizer.json"))
    prompt = "hello world, how are you today?"
    expected = BlockKeyer(TOKEN_MODE, PrefixTokenizer(TOKENIZER)).keys(completions(prompt))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        config = BlockConfig(mode="tokens", block_size=4, seed=11, tokenizer_path=str(path))
        keyer = BlockKeyer.from_config(config)
        assert keyer.keys(completions(prompt)) == expected


def test_keyer_from_config_in_chars_mode_needs_no_tokenizer() -> None:
    keyer = BlockKeyer.from_config(CHAR_MODE)
    assert keyer.tokenizer is None
    assert keyer.keys(completions("y" * 16)) == char_block_keys("y" * 16, 8, 11)
