"""Prompt → token ids for the emulator, and token ids → text pieces for its output.

Two tokenizers behind one interface:

- `HFTokenizer`: a Hugging Face `tokenizer.json`, through the router's own `PrefixTokenizer`
  and with the same rules as the router's `BlockKeyer` (completions prompts get the
  tokenizer's special affixes such as BOS; chat renderings are tokenized per message segment
  without them). A router configured with the same file in token mode computes the same block
  keys as the ones in this pod's KV events.
- `BuiltinTokenizer` (no file needed): a deterministic hash tokenizer. Text is cut into pieces
  by `PIECE_PATTERN` (an optional leading whitespace character, then up to 5 letters, up to 3
  digits, or one other character; leftover whitespace runs are pieces too), and each piece's
  id is ``1000 + xxh3_64(piece UTF-8, seed=0) % 127000`` — about 4 characters a token, ids in
  a Llama-3-sized vocabulary. It is not a `tokenizers` model, so a router cannot load it: with
  it, block keys agree end to end only for prompts sent as token ids (the router keys token-id
  prompts by their tokens in either block mode). Text prompts keyed by a router in chars mode
  never match the token keys of the events; use `--tokenizer` with the router's file for that.

Output text is drawn from `OUTPUT_WORDS` (common English words, one token each in any BPE
vocabulary), so generated ids always have a known text piece.
"""

from __future__ import annotations

import os
import re
from typing import Protocol

import xxhash

from router.blocks import PrefixTokenizer

PIECE_PATTERN = re.compile(r"\s?[^\W\d_]{1,5}|\s?\d{1,3}|\s?[^\w\s]|\s?_|\s+")
BUILTIN_VOCAB = 128_000
_BUILTIN_FIRST_ID = 1000

_OUTPUT_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more out up into do any your what some can time only other new than them these two may "
    "first then its also after like over such our most even made many where before must through "
    "back years much way well down should because each just those people how too little state "
    "good very make world still own see men work long here get both between life being under "
    "never day same another know while last might great old year off come since against go came "
    "right used take three small part model data system cache block token route node fast light "
    "water river stone green field north south level point value order table paper music house"
)
OUTPUT_WORDS = tuple(_OUTPUT_TEXT.split())


class EmulatorTokenizer(Protocol):
    def encode_prompt(self, text: str, segments: tuple[str, ...], chat: bool) -> list[int]:
        """Token ids the engine sees for a text prompt (chat: the rendered conversation)."""
        ...

    def split(self, text: str) -> tuple[list[int], list[str]]:
        """Ids and their text pieces ("".join(pieces) == text), for echoing a prompt."""
        ...

    def piece(self, token_id: int) -> str:
        """Text of one token id (any id, including ones never produced by `split`)."""
        ...

    @property
    def output_vocab(self) -> tuple[list[int], list[str]]:
        """Ids and pieces that generated text is drawn from."""
        ...


def _builtin_id(piece: str) -> int:
    return _BUILTIN_FIRST_ID + xxhash.xxh3_64_intdigest(piece.encode()) % (
        BUILTIN_VOCAB - _BUILTIN_FIRST_ID
    )


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


class BuiltinTokenizer:
    """Deterministic hash tokenizer (see the module docstring for its definition)."""

    def __init__(self) -> None:
        ids = [_builtin_id(" " + w) for w in OUTPUT_WORDS]
        self._pieces: dict[int, str] = {i: " " + w for i, w in zip(ids, OUTPUT_WORDS, strict=True)}
        self._vocab = (list(self._pieces), list(self._pieces.values()))

    def encode_prompt(self, text: str, segments: tuple[str, ...], chat: bool) -> list[int]:
        return [_builtin_id(p) for p in PIECE_PATTERN.findall(text)]

    def split(self, text: str) -> tuple[list[int], list[str]]:
        pieces = PIECE_PATTERN.findall(text)
        return [_builtin_id(p) for p in pieces], pieces

    def piece(self, token_id: int) -> str:
        known = self._pieces.get(token_id)
        if known is not None:
            return known
        # An id we never produced (a token-id prompt echoed): spell it as syllables.
        n = token_id
        out = []
        while True:
            n, r = divmod(n, len(_SYLLABLES))
            out.append(_SYLLABLES[r])
            if n == 0:
                break
        return " " + "".join(out)

    @property
    def output_vocab(self) -> tuple[list[int], list[str]]:
        return self._vocab


class HFTokenizer:
    """A Hugging Face tokenizer, applied exactly as the router's `BlockKeyer` applies it."""

    def __init__(self, path: str) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)
        self._prefix = PrefixTokenizer(self._tok)
        self._affix_before, self._affix_after = self._prefix.special_affixes()
        ids: list[int] = []
        pieces: list[str] = []
        for w in OUTPUT_WORDS:
            enc = self._prefix.encode_plain(" " + w)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
                pieces.append(self._tok.decode(enc, skip_special_tokens=False))
        if not ids:
            raise ValueError(f"tokenizer {path}: no output word encodes to a single token")
        self._vocab = (ids, pieces)

    def encode_prompt(self, text: str, segments: tuple[str, ...], chat: bool) -> list[int]:
        ids = self._prefix.encode(segments or (text,))
        if not chat and (self._affix_before or self._affix_after):
            ids = self._affix_before + ids + self._affix_after
        return ids

    def split(self, text: str) -> tuple[list[int], list[str]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        starts = [start for start, _ in enc.offsets]
        pieces = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(text)
            pieces.append(text[start if i else 0 : end])
        return list(enc.ids), pieces

    def piece(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    @property
    def output_vocab(self) -> tuple[list[int], list[str]]:
        return self._vocab


def load_tokenizer(path: str | None) -> EmulatorTokenizer:
    return HFTokenizer(path) if path else BuiltinTokenizer()
