"""Bounded tokenize work per request: nothing past `blocks.max_keyed_tokens`, character mode
over `blocks.tokenize_max_chars`, and `PrefixTokenizer.encode_prefix`'s cut."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from router.blocks import (
    BUNDLED_TOKENIZER,
    BlockConfig,
    BlockKeyer,
    PrefixTokenizer,
    char_block_keys,
    estimate_tokens,
    token_block_keys,
)
from router.config import ConfigError, parse_config
from router.request import parse_request

_HF = Tokenizer.from_file(BUNDLED_TOKENIZER)
_TOKENIZER = PrefixTokenizer(_HF)


def keyer(**fields: object) -> BlockKeyer:
    cfg = BlockConfig(mode="tokens", tokenizer_path=BUNDLED_TOKENIZER, **fields)  # type: ignore[arg-type]
    return BlockKeyer.from_config(cfg)


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["route", "cache", "token", "prompt,", "block.", "pod", "KV", "42", "(x)", "\n"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def chat(text: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_prompt_over_the_bound_is_keyed_only_up_to_it(path: str) -> None:
    text = words(6000)
    body = chat(text) if "chat" in path else json.dumps({"model": "m", "prompt": text}).encode()
    full = keyer(max_keyed_tokens=None)
    bounded = keyer(max_keyed_tokens=1000)
    whole = parse_request(body, path)
    cut = parse_request(body, path)
    all_keys = full.keys(whole)
    keys = bounded.keys(cut)
    assert whole.token_count is not None and whole.token_count > 3000
    assert len(keys) == 1000 // 16
    assert keys == all_keys[: len(keys)]
    # The count is an estimate once cut: never below the bound, never the cut length.
    assert cut.token_count == max(1000, estimate_tokens(cut))


def test_the_bound_tokenizes_a_prefix_not_the_whole_prompt() -> None:
    seen: list[int] = []

    class Recording(PrefixTokenizer):
        def encode_plain(self, text: str) -> list[int]:
            seen.append(len(text))
            return super().encode_plain(text)

    cfg = BlockConfig(mode="tokens", tokenizer_path=BUNDLED_TOKENIZER, max_keyed_tokens=512)
    k = BlockKeyer(cfg, Recording.from_file(BUNDLED_TOKENIZER))
    seen.clear()
    req = parse_request(chat(words(50_000)), "/v1/chat/completions")
    assert len(k.keys(req)) == 512 // 16
    assert sum(seen) < len(req.prompt) // 10


def test_a_prompt_under_the_bound_is_keyed_in_full_with_its_exact_count() -> None:
    body = chat(words(300))
    a, b = parse_request(body, "/v1/chat/completions"), parse_request(body, "/v1/chat/completions")
    assert keyer(max_keyed_tokens=100_000).keys(a) == keyer(max_keyed_tokens=None).keys(b)
    assert a.token_count == b.token_count


def test_a_prompt_over_the_size_limit_is_keyed_in_character_mode() -> None:
    k = keyer(tokenize_max_chars=2000)
    small = parse_request(chat(words(100)), "/v1/chat/completions")
    big = parse_request(chat(words(1000)), "/v1/chat/completions")
    assert len(big.prompt) > 2000 >= len(small.prompt)
    assert k.keys(big) == char_block_keys(big.prompt, k.config.chars_per_block, k.config.seed)
    assert k.token_count(big) == estimate_tokens(big)
    ids = _TOKENIZER.encode(small.segments)
    assert k.keys(small) == token_block_keys(ids, 16)


def test_bounds_come_from_the_blocks_section_and_bad_values_are_named() -> None:
    cfg = parse_config(
        "blocks: {max_keyed_tokens: 32768, tokenize_max_chars: 500000, tokenize_workers: 3}\n"
    )
    assert cfg.blocks.max_keyed_tokens == 32768
    assert cfg.blocks.tokenize_max_chars == 500_000
    assert cfg.blocks.tokenize_workers == 3
    assert parse_config("blocks: {max_keyed_tokens: null}\n").blocks.max_keyed_tokens is None
    with pytest.raises(ConfigError, match="tokenize_workers must be > 0"):
        parse_config("blocks: {tokenize_workers: 0}\n")
    with pytest.raises(ConfigError, match="max_keyed_tokens"):
        parse_config("blocks: {max_keyed_tokens: -1}\n")


_TEXT = st.lists(
    st.sampled_from(["a", "bc", "Hello", " ", "  ", "\n", ".", ",", "42", "é", "'s", "\t", "(x)"]),
    max_size=200,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_TEXT, n=st.integers(min_value=1, max_value=120))
def test_encode_prefix_gives_the_full_encodes_leading_ids(text: str, n: int) -> None:
    full = _TOKENIZER.encode_plain(text)
    got = _TOKENIZER.encode_prefix(text, n)
    assert len(got) >= min(n, len(full))
    assert got[:n] == full[:n]


@settings(max_examples=50, deadline=None)
@given(segments=st.lists(_TEXT, min_size=1, max_size=5), n=st.integers(1, 150))
def test_bounded_encode_of_segments_is_a_prefix_of_the_full_encode(
    segments: list[str], n: int
) -> None:
    tok = PrefixTokenizer(_HF)  # a cache of its own
    bounded = tok.encode(segments, n)  # cold: nothing cached
    full = tok.encode(segments)
    assert bounded == full[:n]
    assert tok.encode(segments, n) == full[:n]  # warm: from the prefix cache
