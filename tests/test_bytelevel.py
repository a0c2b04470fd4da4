"""PieceCacheEncoder gives exactly the ids `tokenizers` gives, on any text."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from router.blocks import BUNDLED_TOKENIZER
from router.bytelevel import PieceCacheEncoder
from router.loadgen import tokens_to_text

TOK = Tokenizer.from_file(BUNDLED_TOKENIZER)
ENC = PieceCacheEncoder.build(TOK)
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
#: ASCII pieces that exercise every branch of the pattern (contractions, digits, punctuation,
#: whitespace runs, control characters, the added tokens and fragments of them).
FRAGMENTS = [
    "a", "Zq", " the", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'x", "'S", "0", "123",
    " 45", "!", " ?!", "_", "__init__", "\t", "\n", "\r\n", "  ", "   ", "\x0b", "\x0c",
    "\x1c", "\x1f", "\x00", "\x7f", "<|", "|>", "<|eot", "id|>", *SPECIALS,
]  # fmt: skip


def reference(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False).ids


def test_the_bundled_tokenizer_has_the_supported_shape():
    assert ENC is not None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40))
def test_ascii_text_encodes_as_tokenizers_does(parts):
    text = "".join(parts)
    assert ENC.encode(text) == reference(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=80))
def test_any_ascii_string_encodes_as_tokenizers_does(text):
    assert ENC.encode(text) == reference(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_unicode_text_encodes_as_tokenizers_does(text):
    assert ENC.encode(text) == reference(text)


def test_a_cold_cache_and_a_warm_one_give_the_same_ids():
    enc = PieceCacheEncoder.build(TOK)
    text = tokens_to_text(np.random.default_rng(1).integers(0, 50_000, 2_000))
    assert enc.encode(text) == enc.encode(text) == reference(text)


def test_a_full_cache_is_refilled(monkeypatch):
    monkeypatch.setattr("router.bytelevel.MAX_PIECES", 50)
    enc = PieceCacheEncoder.build(TOK)
    text = tokens_to_text(np.random.default_rng(2).integers(0, 50_000, 400))
    assert enc.encode(text) == reference(text)
    assert len(enc._pieces) <= 400


def test_a_tokenizer_with_a_normalizer_is_not_supported():
    doc = TOK.to_str()
    other = Tokenizer.from_str(doc.replace('"normalizer":null', '"normalizer":{"type":"NFC"}'))
    assert other.normalizer is not None
    assert PieceCacheEncoder.build(other) is None


def test_long_prompts_encode_several_times_faster_than_tokenizers():
    enc = PieceCacheEncoder.build(TOK)
    text = tokens_to_text(np.random.default_rng(3).integers(0, 50_000, 20_000))
    enc.encode(text)  # warm the cache, as a pod's does after its first prompts
    t0 = time.perf_counter()
    fast = enc.encode(text)
    t1 = time.perf_counter()
    slow = reference(text)
    t2 = time.perf_counter()
    assert fast == slow
    if (t2 - t1) < 0.05:
        pytest.skip("tokenizers too fast here to compare")
    assert (t1 - t0) < (t2 - t1) / 2
