"""Tokenizing off the event loop, and not at all when no plugin needs block keys."""

from __future__ import annotations

import asyncio
import random
import threading
import time

from router.blocks import BUNDLED_TOKENIZER, BlockKeyer
from router.config import parse_config
from router.request import parse_request
from router.scheduler import Scheduler
from router.tokenize_worker import TokenizeWorker

TOKEN_MODE = f"""
pods: [{{endpoint: 10.0.0.1:8000}}, {{endpoint: 10.0.0.2:8000}}]
blocks:
  mode: tokens
  tokenizer_path: {BUNDLED_TOKENIZER}
"""

UNBOUNDED = "  max_keyed_tokens: null\n  tokenize_max_chars: 4000000\n"
CHAT = "/v1/chat/completions"

ROUND_ROBIN = """
plugins: [{type: round-robin-picker}]
schedulingProfiles:
  - name: rr
    plugins: [{pluginRef: round-robin-picker}]
"""


def chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


async def test_prepare_tokenizes_in_a_worker_thread_with_the_same_keys() -> None:
    sched = Scheduler(parse_config(TOKEN_MODE), seed=0)
    threads: list[str] = []
    prepare = sched.prepare

    def recording_prepare(req):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        prepare(req)

    sched.prepare = recording_prepare  # type: ignore[method-assign]
    worker = TokenizeWorker(sched)
    try:
        req = parse_request(chat("a long question " * 200), "/v1/chat/completions")
        await worker.prepare(req)
    finally:
        worker.close()
    assert threads and threads[0].startswith("kvroute-tokenize")
    fresh = parse_request(chat("a long question " * 200), "/v1/chat/completions")
    assert req.block_keys == BlockKeyer.from_config(sched.config.blocks).keys(fresh)
    assert sched.schedule(req).prompt_tokens == req.token_count


async def test_profiles_reading_no_index_never_tokenize() -> None:
    sched = Scheduler(parse_config(TOKEN_MODE + ROUND_ROBIN), seed=0)
    assert not sched.needs_keys and not sched.tokenizes
    req = parse_request(chat("hello " * 100), "/v1/chat/completions")
    await TokenizeWorker(sched).prepare(req)
    decision = sched.schedule(req)
    assert req.block_keys is None and req.token_count is None
    assert decision.prompt_tokens == (len(req.prompt) + 3) // 4


def _pseudo_words(n_chars: int, vocab_size: int, seed: int) -> str:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(vocab_size)]
    return " ".join(rng.choices(vocab, k=n_chars // 5))[:n_chars]


async def test_a_small_request_is_not_held_up_behind_a_2mb_prompt() -> None:
    # The bound off, so the 2 MB prompt is tokenized in full: the heaviest case.
    sched = Scheduler(parse_config(TOKEN_MODE + UNBOUNDED), seed=0)
    worker = TokenizeWorker(sched)
    small = _pseudo_words(8000, 2000, seed=1)
    try:
        big = parse_request(chat(_pseudo_words(2_000_000, 20_000, seed=2)), CHAT)
        t0 = time.perf_counter()
        big_task = asyncio.ensure_future(worker.prepare(big))
        await asyncio.sleep(0.02)  # the big prompt is in its lane now
        waits = []
        for i in range(5):
            req = parse_request(chat(f"{i} {small}"), CHAT)
            t = time.perf_counter()
            await worker.prepare(req)
            waits.append(time.perf_counter() - t)
            assert req.block_keys and req.tokenize_s is not None
        smalls_done = time.perf_counter() - t0
        assert not big_task.done()
        await big_task
    finally:
        worker.close()
    assert big.tokenize_s is not None
    # Bounds relative to the big prompt's own tokenize time, so a loaded machine (which slows
    # both) does not break them: with one shared thread every small one waited all of it.
    assert max(waits) < 0.5 * big.tokenize_s, (waits, big.tokenize_s)
    assert smalls_done < 0.8 * big.tokenize_s, (smalls_done, big.tokenize_s)


async def test_prepare_records_the_tokenize_time_on_the_request() -> None:
    sched = Scheduler(parse_config(TOKEN_MODE), seed=0)
    worker = TokenizeWorker(sched)
    try:
        req = parse_request(chat("how long is this " * 100), CHAT)
        t = time.perf_counter()
        await worker.prepare(req)
        elapsed = time.perf_counter() - t
    finally:
        worker.close()
    assert req.tokenize_s is not None and 0 < req.tokenize_s <= elapsed
