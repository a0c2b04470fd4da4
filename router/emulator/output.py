"""What a request "generates": token ids, their text, how many, and why it stops.

The plan is fixed when the request arrives (the engine needs the output length up front), and
it is deterministic: the same seed, prompt and choice index give the same text. Honoured body
fields: `max_tokens`, `stop` (strings, cut out of the text as vLLM does by default),
`stop_token_ids`, `ignore_eos`, `min_tokens`, `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import xxhash

from router.emulator.tokenizer import EmulatorTokenizer

FinishReason = Literal["length", "stop"]


@dataclass(slots=True)
class OutputPlan:
    token_ids: list[int]
    #: Text of each token; "".join(pieces) is the choice's text.
    pieces: list[str]
    finish_reason: FinishReason
    #: The stop string or stop token id that ended the output (None for EOS or length).
    stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class OutputRequest:
    max_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None


def plan_output(
    tokenizer: EmulatorTokenizer,
    prompt_ids: list[int],
    prompt_text: str | None,
    want: OutputRequest,
    *,
    mode: Literal["random", "echo"],
    length: Literal["max", "random"],
    pod_seed: int,
    choice: int,
) -> OutputPlan:
    n = want.max_tokens
    prompt_bytes = np.asarray(prompt_ids, dtype="<u4").tobytes()
    rng = np.random.default_rng(
        [pod_seed, want.seed or 0, xxhash.xxh3_64_intdigest(prompt_bytes), choice]
    )
    if mode == "echo":
        if prompt_text:
            ids, pieces = tokenizer.split(prompt_text)
        else:
            ids = list(prompt_ids)
            pieces = [tokenizer.piece(t) for t in ids]
        if not ids:
            ids, pieces = tokenizer.output_vocab
        reps = -(-n // len(ids))
        ids, pieces = (ids * reps)[:n], (pieces * reps)[:n]
    else:
        vocab_ids, vocab_pieces = tokenizer.output_vocab
        picks = rng.integers(0, len(vocab_ids), size=n)
        ids = [vocab_ids[i] for i in picks]
        pieces = [vocab_pieces[i] for i in picks]

    finish: FinishReason = "length"
    stop_reason: str | int | None = None
    end = n
    if length == "random" and not want.ignore_eos:
        eos_at = int(rng.integers(max(1, want.min_tokens), n + 1))
        if eos_at < n:
            end, finish = eos_at, "stop"
    if want.stop_token_ids:
        stops = set(want.stop_token_ids)
        for i in range(max(0, want.min_tokens - 1), end):
            if ids[i] in stops:
                end, finish, stop_reason = i + 1, "stop", ids[i]
                pieces = [*pieces[:i], ""]
                break
    ids, pieces = ids[:end], pieces[:end]
    if want.stop:
        cut = _first_stop(pieces, want.stop, want.min_tokens)
        if cut is not None:
            k, char_pos, stop = cut
            text = "".join(pieces[: k + 1])[:char_pos]
            ids = ids[: k + 1]
            pieces = _recut(pieces[: k + 1], text)
            finish, stop_reason = "stop", stop
    return OutputPlan(ids, pieces, finish, stop_reason)


def _first_stop(
    pieces: list[str], stops: tuple[str, ...], min_tokens: int
) -> tuple[int, int, str] | None:
    """(index of the token completing the earliest stop string, its start in the text, it)."""
    text = "".join(pieces)
    best: tuple[int, str] | None = None
    for s in stops:
        pos = text.find(s)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    if best is None:
        return None
    pos, stop = best
    end = pos + len(stop)
    total = 0
    for k, p in enumerate(pieces):
        total += len(p)
        if total >= end:
            if k + 1 < min_tokens:
                return None
            return k, pos, stop
    return None


def _recut(pieces: list[str], text: str) -> list[str]:
    """The same token pieces, truncated so that they concatenate to `text` (a prefix)."""
    out = []
    left = len(text)
    pos = 0
    for p in pieces:
        take = min(len(p), left)
        out.append(text[pos : pos + take])
        pos += take
        left -= take
    return out
