"""Bounded admission per model: at most `max_inflight` forwarded, at most `max_queued` waiting.

Beyond both, a request is refused with 429. Sheddable requests (negative priority) go first:
one arriving at a full queue is refused, and a standard request arriving at a full queue takes
the place of the most recently queued sheddable one, which is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

from router.request import RequestError


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    sheddable: bool


@dataclass(slots=True)
class _ModelGate:
    inflight: int = 0
    queue: deque[_Waiter] = field(default_factory=deque)


class AdmissionQueue:
    def __init__(self, max_inflight: int, max_queued: int, queue_timeout_s: float) -> None:
        #: 0 = unbounded.
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self._gates: dict[str, _ModelGate] = {}

    def inflight(self, model: str) -> int:
        gate = self._gates.get(model)
        return gate.inflight if gate else 0

    def queued(self, model: str) -> int:
        gate = self._gates.get(model)
        return len(gate.queue) if gate else 0

    async def acquire(self, model: str, sheddable: bool) -> None:
        """Return once the request may be forwarded; raise `RequestError(429)` if refused.
        Every successful `acquire` must be paired with one `release`."""
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = _ModelGate()
        if not self.max_inflight or (gate.inflight < self.max_inflight and not gate.queue):
            gate.inflight += 1
            return
        if len(gate.queue) >= self.max_queued:
            if sheddable:
                raise RequestError(
                    429, f"model '{model}' is saturated; sheddable request refused", "shed"
                )
            if not self._evict_sheddable(gate):
                raise RequestError(
                    429,
                    f"model '{model}' has {len(gate.queue)} requests queued; try later",
                    "queue_full",
                )
        waiter = _Waiter(asyncio.get_running_loop().create_future(), sheddable)
        gate.queue.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout_s)
        except TimeoutError:
            if waiter.future.done() and waiter.future.exception() is None:
                return  # granted at the deadline: keep the slot
            self._forget(gate, waiter)
            raise RequestError(
                429,
                f"waited {self.queue_timeout_s:g}s in the admission queue of '{model}'",
                "queue_timeout",
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(model)  # the slot was handed to us as we were cancelled
            else:
                self._forget(gate, waiter)
            raise

    def release(self, model: str) -> None:
        gate = self._gates[model]
        while gate.queue:
            waiter = gate.queue.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes to the waiter
                return
        gate.inflight -= 1

    @staticmethod
    def _evict_sheddable(gate: _ModelGate) -> bool:
        for i in range(len(gate.queue) - 1, -1, -1):
            waiter = gate.queue[i]
            if waiter.sheddable and not waiter.future.done():
                del gate.queue[i]
                waiter.future.set_exception(
                    RequestError(
                        429, "displaced from the admission queue by a standard request", "shed"
                    )
                )
                return True
        return False

    @staticmethod
    def _forget(gate: _ModelGate, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            gate.queue.remove(waiter)
