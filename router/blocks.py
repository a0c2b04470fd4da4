"""Prompt → chained block keys.

This module owns kvroute's block key: the one function that turns token ids (or, without a
tokenizer, characters) into the 64-bit keys that the `BlockIndex`, the scorers, the KV-event
ingester and the simulated engines all agree on.

Key definition (token mode)::

    root     = seed                                   if no extra key (e.g. LoRA name)
             = xxh3_64(extra.encode(), seed=seed)     otherwise
    key[i]   = xxh3_64(tokens[i*B:(i+1)*B] as little-endian uint32 bytes, seed=key[i-1])
    key[-1]  = root

The parent key enters as the xxh3 seed rather than as 8 concatenated bytes: the result is the
same kind of chained hash (equal keys ⇔ equal whole prefixes, up to 64-bit collisions) and it
saves one allocation per block, which keeps keying an 8k-token prompt well under 0.3 ms.
Only full blocks are keyed; a partial last block never is (vLLM caches only full blocks).

Character mode hashes the UTF-8 bytes of `chars_per_block`-character slices with the same chain.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import xxhash

from router.bytelevel import PieceCacheEncoder

if TYPE_CHECKING:
    from router.request import RoutingRequest

_xxh3 = xxhash.xxh3_64_intdigest

#: kvroute's bundled tokenizer (byte-level BPE, 8k vocab, with a Llama-3-style chat template
#: beside it): the emulator's default, so router and emulator key blocks identically with no
#: download. A real fleet points `blocks.tokenizer_path` at its model's tokenizer.json.
BUNDLED_TOKENIZER = str(Path(__file__).parent / "data" / "tokenizer" / "tokenizer.json")
_U32_LE = np.dtype("<u4")
#: array('I') holds the key's little-endian uint32 bytes as they are on this machine.
_NATIVE_U32 = sys.byteorder == "little" and array("I").itemsize == 4


def root_key(seed: int, extra: str | None = None) -> int:
    """Parent key of a chain's first block: the seed, mixed with an extra key such as a LoRA."""
    if not extra:
        return seed
    return _xxh3(extra.encode(), seed=seed)


def token_block_keys(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    seed: int = 0,
    extra: str | None = None,
    parent: int | None = None,
) -> list[int]:
    """Chained keys of every full block of `token_ids`.

    `parent` continues an existing chain (the router key of the block before `token_ids[0]`);
    it is what the KV-event ingester passes for a `BlockStored` whose parent it knows.
    """
    # Sliced as bytes (a 64-byte copy is cheaper than a memoryview object) and the seed
    # passed positionally (keyword parsing costs as much as the hash of a small block).
    data: bytes
    if _NATIVE_U32 and isinstance(token_ids, array) and token_ids.typecode == "I":
        data = token_ids.tobytes()
    elif _NATIVE_U32 and isinstance(token_ids, list):
        data = array("I", token_ids).tobytes()  # ~3x faster than numpy from a list of ints
    else:
        data = np.asarray(token_ids, dtype=_U32_LE).tobytes()
    step = block_size * 4
    key = root_key(seed, extra) if parent is None else parent
    keys: list[int] = []
    append = keys.append
    xxh3 = _xxh3
    for start in range(0, len(data) - step + 1, step):
        key = xxh3(data[start : start + step], key)
        append(key)
    return keys


def char_block_keys(
    text: str, chars_per_block: int, seed: int = 0, extra: str | None = None
) -> list[int]:
    """Chained keys of every full `chars_per_block`-character slice of `text`."""
    n_full = len(text) // chars_per_block
    key = root_key(seed, extra)
    keys = [0] * n_full
    for i in range(n_full):
        key = _xxh3(text[i * chars_per_block : (i + 1) * chars_per_block].encode(), seed=key)
        keys[i] = key
    return keys


@dataclass(frozen=True, slots=True)
class BlockConfig:
    """How prompts are cut into blocks. `mode` is "tokens" when a tokenizer is configured."""

    mode: Literal["tokens", "chars"] = "chars"
    block_size: int = 16
    chars_per_block: int = 64
    seed: int = 0
    tokenizer_path: str | None = None
    tokenize_cache_entries: int = 1024
    #: Token mode tokenizes (and keys) at most this many prompt tokens: the model's context
    #: (`max_model_len`) — a longer prompt is rejected by the pod anyway, and blocks past it
    #: can never be cached. None: no bound.
    max_keyed_tokens: int | None = 131_072
    #: Token mode keys a prompt longer than this many characters in character mode instead
    #: (no tokenizer work at all; such a prompt matches no token-mode cache entry).
    tokenize_max_chars: int = 1_048_576
    #: Worker threads tokenizing prompts up to `tokenize_large_chars` characters; longer ones
    #: take a lane of their own, so one long prompt never holds up the short ones.
    tokenize_workers: int = 2
    tokenize_large_chars: int = 32_768

    def __post_init__(self) -> None:
        for name in ("tokenize_max_chars", "tokenize_workers", "tokenize_large_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_keyed_tokens is not None and self.max_keyed_tokens <= 0:
            raise ValueError(f"max_keyed_tokens must be > 0 or null, got {self.max_keyed_tokens}")

    @property
    def tokens_per_block(self) -> int:
        """Approximate tokens a block stands for (chars mode assumes ~4 characters a token)."""
        return self.block_size if self.mode == "tokens" else max(1, self.chars_per_block // 4)


class PrefixTokenizer:
    """A Hugging Face `tokenizers` tokenizer with an LRU cache keyed on prompt-segment prefixes.

    A prompt is given as segments (a chat renders one segment per message). The cache maps
    the hash of segments[0..i] to the token ids of that prefix, so turn N of a conversation
    tokenizes only what turn N-1 did not have. Segment boundaries in chat templates sit on
    special tokens or newlines, where tokenizing the parts equals tokenizing the whole.
    """

    def __init__(self, tokenizer: object, max_entries: int = 1024) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError("PrefixTokenizer needs a tokenizers.Tokenizer")
        self._tok = tokenizer
        #: Same ids as `tokenizers`, ~7x less CPU on ASCII text (None: a tokenizer shape it
        #: does not cover; `tokenizers` then does all of it).
        self._fast = PieceCacheEncoder.build(tokenizer)
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        #: Guards `_cache` only (encoding runs unlocked): faces tokenize on several threads.
        self._lock = threading.Lock()
        self._max = max_entries
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_file(cls, path: str, max_entries: int = 1024) -> PrefixTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(path), max_entries)

    def encode_plain(self, text: str) -> list[int]:
        """Tokenize without the prefix cache (and without special tokens added by
        post-processing). `encode_batch` rather than `encode` where `tokenizers` runs: it
        releases the GIL, so a long prompt tokenized on a worker thread does not stall the
        event loop."""
        if self._fast is not None:
            try:
                return self._fast.encode(text)
            except KeyError:
                # Its piece cache was reset by another tokenize thread mid-lookup (it clears
                # itself when full); `tokenizers` gives the same ids.
                pass
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def special_affixes(self) -> tuple[list[int], list[int]]:
        """Ids the tokenizer's post-processor puts before and after one sequence (Llama: BOS).

        vLLM adds them to completions prompts; chat templates write their own.
        """
        probe = "hello world"
        plain = self.encode_plain(probe)
        full = self._tok.encode(probe, add_special_tokens=True).ids
        n = len(plain)
        if not n:
            return [], []
        for start in range(len(full) - n + 1):
            if full[start : start + n] == plain:
                return full[:start], full[start + n :]
        return [], []

    def encode(self, segments: Sequence[str], max_tokens: int | None = None) -> list[int]:
        """Token ids of the concatenated segments; with `max_tokens`, only the first
        `max_tokens` of them (the same ids as a full encode's first `max_tokens`), without
        tokenizing much past them (see `encode_prefix`)."""
        prefix_hashes: list[int] = []
        h = 0
        for seg in segments:
            h = _xxh3(seg.encode(), seed=h)
            prefix_hashes.append(h)
        # Longest cached prefix of whole segments.
        start = 0
        ids: list[int] = []
        with self._lock:
            for i in range(len(segments) - 1, -1, -1):
                cached = self._cache.get(prefix_hashes[i])
                if cached is not None:
                    self._cache.move_to_end(prefix_hashes[i])
                    ids = cached.tolist()
                    start = i + 1
                    self.hits += 1
                    break
            else:
                self.misses += 1
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
        # Remember the last two boundaries: the next turn of a chat extends the messages
        # (all but the trailing generation prompt), a repeated request matches the whole.
        last = len(segments) - 1
        for i in range(start, len(segments)):
            if max_tokens is None:
                ids.extend(self.encode_plain(segments[i]))
            else:
                ids.extend(self.encode_prefix(segments[i], max_tokens - len(ids)))
                if len(ids) >= max_tokens:
                    return ids[:max_tokens]  # a cut segment is not remembered
            if i >= last - 1:
                self._remember(prefix_hashes[i], ids)
        return ids

    def encode_prefix(self, text: str, max_tokens: int) -> list[int]:
        """At least the first `max_tokens` ids of `text` (all of them when it has fewer),
        tokenizing a prefix of it: the text is cut just before a space that follows a
        non-space character, where the pre-tokenizers of byte-level BPE (GPT-2, Llama 3) and
        SentencePiece-style tokenizers cut too, so the ids up to the cut equal the full
        encode's. The first cut assumes 4 characters a token; a cut that gave too few ids is
        moved by the ratio it measured (plus 10%) until enough came or the whole text was
        taken."""
        n = len(text)
        max_tokens = max(1, max_tokens)
        want = max_tokens * 4 + 256
        while want < n:
            cut = _space_cut(text, want)
            if cut is None:
                break
            ids = self.encode_plain(text[:cut])
            if len(ids) > max_tokens:
                return ids
            want = int(cut * 1.1 * max_tokens / max(1, len(ids))) + 256
        return self.encode_plain(text)

    def _remember(self, key: int, ids: list[int]) -> None:
        # Stored packed (4 bytes a token, not a Python int's ~32): a full cache of long
        # prompts stays in the tens of megabytes.
        packed = array("I", ids)
        with self._lock:
            self._cache[key] = packed
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)


def _space_cut(text: str, at: int) -> int | None:
    """The index of the first space at or after `at` that follows a non-whitespace
    character (a pre-token boundary), or None when there is none."""
    m = _CUT.search(text, max(1, at) - 1)
    return None if m is None else m.start() + 1


_CUT = re.compile(r"\S ")


def estimate_tokens(req: RoutingRequest) -> int:
    """Prompt tokens without tokenizing: exact when known, else ceil(len(prompt) / 4)."""
    if req.token_count is not None:
        return req.token_count
    if req.token_ids is not None:
        return len(req.token_ids)
    return (len(req.prompt) + 3) // 4


class BlockKeyer:
    """`RoutingRequest` → block keys (and prompt token count), the one keying of a request.

    Token mode keys `req.token_ids` when the body gave them, else the tokenized segments
    (completions prompts get the tokenizer's special tokens, as vLLM adds them; chat
    renderings carry their own). Chars mode keys the prompt text; a request that came as
    token ids is keyed on its tokens even then, since it has no text. A LoRA adapter enters
    every key as the chain's extra key. Keys are stored on the request and reused.
    """

    def __init__(self, config: BlockConfig, tokenizer: PrefixTokenizer | None = None) -> None:
        if config.mode == "tokens" and tokenizer is None:
            raise ValueError("block mode 'tokens' needs a tokenizer")
        self.config = config
        self.tokenizer = tokenizer
        self._prefix_ids: list[int] = []
        self._suffix_ids: list[int] = []
        if tokenizer is not None:
            self._prefix_ids, self._suffix_ids = tokenizer.special_affixes()

    @classmethod
    def from_config(cls, config: BlockConfig) -> BlockKeyer:
        """Load the tokenizer (a tokenizer.json, or a directory holding one) in token mode."""
        if config.mode != "tokens":
            return cls(config)
        path = config.tokenizer_path
        if not path:
            raise ValueError("block mode 'tokens' needs tokenizer_path")
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        return cls(config, PrefixTokenizer.from_file(path, config.tokenize_cache_entries))

    def keys(self, req: RoutingRequest) -> list[int]:
        keys = req.block_keys
        if keys is not None:
            return keys
        cfg = self.config
        ids = req.token_ids
        if ids is None and cfg.mode == "tokens" and len(req.prompt) <= cfg.tokenize_max_chars:
            ids = self._tokenize(req)
            bound = cfg.max_keyed_tokens
            # Cut at the bound: the prompt's length is then only estimated.
            req.token_count = (
                max(len(ids), estimate_tokens(req))
                if bound is not None and len(ids) >= bound
                else len(ids)
            )
        if ids is not None:
            keys = token_block_keys(ids, cfg.block_size, cfg.seed, req.lora_adapter)
        else:
            keys = char_block_keys(req.prompt, cfg.chars_per_block, cfg.seed, req.lora_adapter)
        req.block_keys = keys
        return keys

    def token_count(self, req: RoutingRequest) -> int:
        """Prompt tokens: exact when token ids are given or a tokenizer is configured.

        Chars mode without token ids estimates ceil(len(prompt) / 4), the same 4 characters
        a token that `BlockConfig.tokens_per_block` assumes.
        """
        n = req.token_count
        if n is not None:
            return n
        if req.token_ids is not None:
            n = len(req.token_ids)
        elif self.config.mode == "tokens" and len(req.prompt) <= self.config.tokenize_max_chars:
            if req.block_keys is None:
                self.keys(req)  # tokenizes once and records the count
                if req.token_count is not None:
                    return req.token_count
            n = len(self._tokenize(req))
        else:
            return estimate_tokens(req)
        req.token_count = n
        return n

    def _tokenize(self, req: RoutingRequest) -> list[int]:
        tok = self.tokenizer
        assert tok is not None  # guaranteed by __init__ in token mode
        bound = self.config.max_keyed_tokens
        affixes = req.kind == "completions" and (self._prefix_ids or self._suffix_ids)
        if bound is not None and affixes:
            bound = max(1, bound - len(self._prefix_ids))
        ids = tok.encode(req.segments or (req.prompt,), bound)
        if bound is not None and len(ids) >= bound:
            return self._prefix_ids + ids if affixes else ids  # cut: no suffix after it
        if affixes:
            ids = self._prefix_ids + ids + self._suffix_ids
        return ids
