"""TokenizeProcess: a pod's long prompts tokenized and keyed in a child process at idle priority.

vLLM tokenizes in its API-server process and runs the engine steps in a separate EngineCore
process, so a long prompt's tokenization never delays a step. The emulator ran both on one
event loop: tokenizing a 25k-token Mooncake prompt (~70k pod tokens) held the loop for tens to
hundreds of milliseconds, and every engine step due meanwhile was handed over that late (the
pod's `kvroute_emulator_step_lag_seconds` p99 72-177 ms on an idle machine; a profile of one pod
under a Mooncake slice: ~87% of the loop's busy samples in `encode_prompt`). A thread would not
do: `tokenizers.Tokenizer.encode` holds the GIL (measured: a 0.5 s encode in a thread stalls the
main thread 0.5 s; `encode_batch` releases it), and the block keys are Python work anyway.

So prompts longer than `MIN_CHARS` go to one child process (spawned, not forked: the pod has
ZMQ threads) that tokenizes and keys them and returns both packed. The child runs under
`SCHED_IDLE` (nice 19 where that is refused): on a core shared with the pods' step loops it
takes only the cycles they leave, as a separate API-server core would. One process, one task at
a time: requests are tokenized in arrival order and the tokenizer's prefix cache stays
deterministic. Short prompts (the common case of tests) stay inline: they cost under a
millisecond, less than the round trip. If the child dies, the pod tokenizes inline again
(logged once) rather than failing requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from router.blocks import token_block_keys

log = logging.getLogger(__name__)

#: Prompts at least this long (characters) are tokenized in the child process.
MIN_CHARS = 2048

_TOKENIZER = None


def _init_child(tokenizer_path: str | None, pod_pid: int) -> None:
    """Child start: die with the pod, give way to it on the CPU, load the tokenizer once."""
    global _TOKENIZER
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != pod_pid:
        # The pod died while this process was starting (before the death signal was armed):
        # nobody will ever send work or stop it.
        os._exit(0)
    # Belt and braces: the death signal follows the thread that spawned this process, not the
    # pod; poll the parent too.
    threading.Thread(target=_watch_parent, args=(pod_pid,), daemon=True).start()
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(19)
    from router.emulator.tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer(tokenizer_path)


def _watch_parent(pod_pid: int) -> None:
    while os.getppid() == pod_pid:
        time.sleep(1.0)
    os._exit(0)


def _tokenize(
    text: str, segments: tuple[str, ...], chat: bool, block_size: int, seed: int, lora: str | None
) -> tuple[bytes, bytes]:
    """(token ids as uint32 bytes, block keys as uint64 bytes) of one prompt."""
    assert _TOKENIZER is not None
    ids = _TOKENIZER.encode_prompt(text, segments, chat)
    keys = token_block_keys(ids, block_size, seed, lora) if ids else []
    return np.asarray(ids, dtype=np.uint32).tobytes(), array("Q", keys).tobytes()


def _ready() -> bool:
    return _TOKENIZER is not None


class TokenizeProcess:
    def __init__(self, tokenizer_path: str | None, block_size: int, seed: int) -> None:
        self.tokenizer_path = tokenizer_path
        self.block_size = block_size
        self.seed = seed
        self._pool: ProcessPoolExecutor | None = None
        self.broken = False

    def start(self) -> None:
        """Spawn the child now (it loads in the background; the first long prompt waits)."""
        if self._pool is None and not self.broken:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_child,
                initargs=(self.tokenizer_path, os.getpid()),
            )
            self._pool.submit(_ready)

    async def tokenize(
        self, text: str, segments: tuple[str, ...], chat: bool, lora: str | None
    ) -> tuple[np.ndarray, list[int]] | None:
        """(token ids, block keys) of a prompt, or None when the child is unavailable (the
        caller tokenizes inline then)."""
        self.start()
        if self._pool is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            ids, keys = await loop.run_in_executor(
                self._pool, _tokenize, text, segments, chat, self.block_size, self.seed, lora
            )
        except BrokenProcessPool:
            log.error("tokenizer process died; tokenizing on the event loop from now on")
            self.broken = True
            self.close()
            return None
        key_list = array("Q")
        key_list.frombytes(keys)
        return np.frombuffer(ids, dtype=np.uint32), key_list.tolist()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
