"""TokenizeWorker: run `Scheduler.prepare` (tokenize + key a prompt) off a face's event loop.

Tokenizing a long prompt costs milliseconds (an 8k-token chat ≈ 12 ms with a BPE tokenizer,
a 2 MB one seconds); on the event loop that stalls every other request of the face, and on a
single worker thread every request queued behind it. So the work runs in two lanes of threads:
prompts up to `blocks.tokenize_large_chars` characters in a pool of `blocks.tokenize_workers`
threads, longer ones in a lane of their own (one thread: long prompts wait for each other,
never short ones for them). The threads share the GIL, so a short prompt next to a long one
takes about twice its own time plus the longest single C call of the long one's thread (the
pre-tokenizer's regex over one message: ~0.15 s for 2 MB on a loaded machine), not the whole
of the long one's time (seconds).

A thread unblocks the loop only while the tokenizer releases the GIL or Python switches
threads (every `sys.getswitchinterval()`, 5 ms): `tokenizers` 0.23's `encode_batch` releases
it, its `Tokenizer.encode` does NOT (see router/bytelevel.py for the cheaper exact encoder the
keyer uses, pure Python, which switches). The tokenizer's prefix cache takes a lock per access.
Character mode and prompts given as token ids are cheap and stay on the loop.

`prepare` records the tokenize + key time on the request (`RoutingRequest.tokenize_s`), for the
faces' `kvroute_tokenize_duration_seconds` histogram; the scheduling-time metric excludes it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from router.request import RoutingRequest
from router.scheduler import Scheduler

#: Buckets of the faces' `kvroute_tokenize_duration_seconds` (0.1 ms for a short chat, seconds
#: for a 2 MB prompt).
TOKENIZE_BUCKETS: tuple[float, ...] = (
    *(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


class TokenizeWorker:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        blocks = scheduler.config.blocks
        self.workers = blocks.tokenize_workers
        self.large_chars = blocks.tokenize_large_chars
        self.max_chars = blocks.tokenize_max_chars
        self._small: ThreadPoolExecutor | None = None
        self._large: ThreadPoolExecutor | None = None

    async def prepare(self, req: RoutingRequest) -> None:
        """Tokenize and key `req` (results kept on it for `Scheduler.schedule`)."""
        sched = self.scheduler
        n = len(req.prompt)
        if not sched.tokenizes or req.token_ids is not None or n > self.max_chars:
            t0 = time.perf_counter()
            sched.prepare(req)  # no tokenizer runs: cheap enough for the loop
            req.tokenize_s = time.perf_counter() - t0
            return
        pool = self._lane(n > self.large_chars)
        await asyncio.get_running_loop().run_in_executor(pool, self._timed_prepare, req)

    def _timed_prepare(self, req: RoutingRequest) -> None:
        # Timed on the worker thread: the time spent tokenizing, not waiting for a thread.
        t0 = time.perf_counter()
        self.scheduler.prepare(req)
        req.tokenize_s = time.perf_counter() - t0

    def _lane(self, large: bool) -> ThreadPoolExecutor:
        if large:
            if self._large is None:
                self._large = ThreadPoolExecutor(1, thread_name_prefix="kvroute-tokenize-large")
            return self._large
        if self._small is None:
            self._small = ThreadPoolExecutor(self.workers, thread_name_prefix="kvroute-tokenize")
        return self._small

    def close(self) -> None:
        for pool in (self._small, self._large):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._small = self._large = None
