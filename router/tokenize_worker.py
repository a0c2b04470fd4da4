"""TokenizeWorker: run `Scheduler.prepare` (tokenize + key a prompt) off a face's event loop.

Tokenizing a long prompt costs milliseconds (an 8k-token chat ≈ 12 ms with a BPE tokenizer);
on the event loop that stalls every other request of the face. A worker thread unblocks the
loop only while the tokenizer releases the GIL: `tokenizers` 0.23's `encode_batch` does, its
`Tokenizer.encode` does NOT (measured: a 0.5 s `encode` of a 70k-token prompt in a thread
stalled the main thread 0.54 s; `encode_batch` of the same text, 8.5 ms at most), so what the
scheduler's tokenizer calls decides whether this thread helps (see router/bytelevel.py for a
cheaper exact encoder). One thread: the tokenizer's prefix cache is not thread-safe, and one
encode at a time keeps the cache's hit order deterministic. Character mode and prompts given as
token ids are cheap and stay on the loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from router.request import RoutingRequest
from router.scheduler import Scheduler


class TokenizeWorker:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._pool: ThreadPoolExecutor | None = None

    async def prepare(self, req: RoutingRequest) -> None:
        """Tokenize and key `req` (results kept on it for `Scheduler.schedule`)."""
        sched = self.scheduler
        if not sched.tokenizes or req.token_ids is not None:
            sched.prepare(req)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvroute-tokenize")
        await asyncio.get_running_loop().run_in_executor(self._pool, sched.prepare, req)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
