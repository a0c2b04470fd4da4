"""Long prompts are tokenized and keyed in the pod's tokenizer process, with the same result as
inline, and the engine's step loop keeps running meanwhile."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

import httpx
import numpy as np

from router.blocks import BUNDLED_TOKENIZER, token_block_keys
from router.emulator.runtime import PodRuntime
from router.emulator.server import EmulatorPod
from router.emulator.tokenize_process import MIN_CHARS, TokenizeProcess, _tokenize
from router.loadgen import tokens_to_text
from router.request import parse_request
from tests.emulator.conftest import FAST, MODEL

LONG = tokens_to_text(np.random.default_rng(7).integers(0, 50_000, 3 * MIN_CHARS))


def chat_body(text: str, **extra: object) -> bytes:
    import json

    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    ).encode()


async def test_the_child_gives_the_ids_and_keys_inline_tokenizing_gives():
    rt = PodRuntime(replace(FAST, tokenizer=BUNDLED_TOKENIZER, tokenize_process=True))
    try:
        req = parse_request(
            chat_body(LONG), "/v1/chat/completions", {}, chat_template=rt.chat_template
        )
        offloaded = await rt.prepare_async(req)
        inline = rt.prepare(req)
        assert rt.tokenize_process._pool is not None  # the long prompt went to the child
        a, b = offloaded.job.generations[0], inline.job.generations[0]
        assert list(a.sim.token_ids) == list(b.sim.token_ids)
        assert len(a.sim.token_ids) > MIN_CHARS / 4
        assert a.sim.block_keys == b.sim.block_keys
        assert a.sim.block_keys == token_block_keys(
            list(b.sim.token_ids), rt.engine_config.block_size, rt.settings.seed
        )
        assert offloaded.prompt_tokens == inline.prompt_tokens
    finally:
        rt.close()


async def test_without_the_setting_every_prompt_is_tokenized_inline():
    rt = PodRuntime(replace(FAST, tokenizer=BUNDLED_TOKENIZER))
    try:
        req = parse_request(
            chat_body(LONG), "/v1/chat/completions", {}, chat_template=rt.chat_template
        )
        prep = await rt.prepare_async(req)
        assert prep.prompt_tokens[0] > MIN_CHARS / 4
        assert rt.tokenize_process._pool is None  # no child was ever started
    finally:
        rt.close()


async def test_short_prompts_stay_inline():
    rt = PodRuntime(replace(FAST, tokenizer=BUNDLED_TOKENIZER, tokenize_process=True))
    try:
        req = parse_request(
            chat_body("hello there"), "/v1/chat/completions", {}, chat_template=rt.chat_template
        )
        prep = await rt.prepare_async(req)
        assert prep.prompt_tokens[0] > 0
        assert rt.tokenize_process._pool is None
    finally:
        rt.close()


async def test_the_child_runs_at_idle_priority():
    proc = TokenizeProcess(BUNDLED_TOKENIZER, 16, 0)
    try:
        got = await proc.tokenize(LONG, (), False, None)
        assert got is not None
        pool = proc._pool
        assert pool is not None
        (pid,) = list(pool._processes)  # one worker
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    finally:
        proc.close()


def test_the_child_function_packs_ids_and_keys():
    import router.emulator.tokenize_process as tp
    from router.emulator.tokenizer import load_tokenizer

    tp._TOKENIZER = load_tokenizer(BUNDLED_TOKENIZER)
    try:
        ids_b, keys_b = _tokenize(LONG, (), False, 16, 3, "adapter-a")
        ids = np.frombuffer(ids_b, dtype=np.uint32).tolist()
        assert ids == tp._TOKENIZER.encode_prompt(LONG, (), False)
        keys = np.frombuffer(keys_b, dtype=np.uint64).tolist()
        assert keys == token_block_keys(ids, 16, 3, "adapter-a")
    finally:
        tp._TOKENIZER = None


async def test_a_dead_child_falls_back_to_inline_tokenizing():
    rt = PodRuntime(replace(FAST, tokenizer=BUNDLED_TOKENIZER, tokenize_process=True))
    try:
        req = parse_request(
            chat_body(LONG), "/v1/chat/completions", {}, chat_template=rt.chat_template
        )
        first = await rt.prepare_async(req)
        pool = rt.tokenize_process._pool
        assert pool is not None
        for p in list(pool._processes.values()):
            p.kill()
            p.join(5)
        again = await rt.prepare_async(req)
        assert rt.tokenize_process.broken
        assert list(again.job.generations[0].sim.token_ids) == list(
            first.job.generations[0].sim.token_ids
        )
    finally:
        rt.close()


async def test_steps_keep_their_time_while_a_long_prompt_tokenizes():
    """A pod streaming a short request's tokens while long prompts arrive: with the prompts
    tokenized off the loop, no step is handed over more than a few ms late (inline, a 25k-token
    prompt held the loop ~70 ms and more)."""
    settings = replace(
        FAST,
        tokenizer=BUNDLED_TOKENIZER,
        speedup=1.0,
        max_model_len=262_144,
        num_gpu_blocks=None,
        tokenize_process=True,
    )
    long_text = tokens_to_text(np.random.default_rng(8).integers(0, 50_000, 25_000))
    async with EmulatorPod(settings) as pod, httpx.AsyncClient(timeout=60) as client:
        url = f"http://{pod.runtime.endpoint}/v1/chat/completions"
        # Warm the child (spawn + tokenizer load) so the measured part is steady state.
        await client.post(url, content=chat_body(long_text[:MIN_CHARS], max_tokens=1))
        lags: list[float] = []
        pod.runtime.metrics.step_lag = lags.append  # type: ignore[method-assign]
        streaming = asyncio.create_task(
            client.post(url, content=chat_body("count to fifty", max_tokens=200, ignore_eos=True))
        )
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        for i in range(3):
            r = await client.post(url, content=chat_body(f"{i} {long_text}", max_tokens=1))
            assert r.status_code == 200, r.text
        spent = time.perf_counter() - t0
        assert (await streaming).status_code == 200
    assert len(lags) > 50
    # Three 70k-token prompts tokenized while steps ran: inline they would have blocked the
    # loop for `spent` minus the engine time; off the loop the worst step stays far below it.
    assert max(lags) < min(0.05, spent / 6), (max(lags), spent)


def test_a_child_whose_pod_died_while_it_started_exits():
    """The death signal is armed only once the child runs: if the pod is already gone by
    then, the child must not wait for work forever."""
    import subprocess
    import sys

    code = (
        "import os; from router.emulator.tokenize_process import _init_child; "
        "_init_child(None, os.getppid() + 1); print('still here')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "still here" not in done.stdout
