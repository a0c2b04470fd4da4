"""Tokenizing off the event loop, and not at all when no plugin needs block keys."""

from __future__ import annotations

import threading

from router.blocks import BUNDLED_TOKENIZER, BlockKeyer
from router.config import parse_config
from router.request import parse_request
from router.scheduler import Scheduler
from router.tokenize_worker import TokenizeWorker

TOKEN_MODE = f"""
pods: [{{endpoint: 10.0.0.1:8000}}, {{endpoint: 10.0.0.2:8000}}]
blocks: {{mode: tokens, tokenizer_path: {BUNDLED_TOKENIZER}}}
"""

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
