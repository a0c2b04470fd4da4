"""SIGHUP shared by everything in a process that reloads on it.

asyncio keeps one handler per signal and loop: a second `add_signal_handler(SIGHUP, ...)`
replaces the first, and a `remove_signal_handler` drops it for everyone. The config reloader
and static discovery both reload on SIGHUP in one face, so each subscribes here instead, and
one loop handler calls every subscriber.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable

_subscribers: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}


def subscribe_sighup(callback: Callable[[], None]) -> Callable[[], None] | None:
    """Call `callback` on the running loop at each SIGHUP; returns the unsubscribe function,
    or None where signals cannot be handled (no SIGHUP, or not the main thread)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return None
    loop = asyncio.get_running_loop()
    callbacks = _subscribers.get(loop)
    if callbacks is None:
        callbacks = _subscribers[loop] = []
        loop.add_signal_handler(signal.SIGHUP, _dispatch, loop)
    callbacks.append(callback)

    def unsubscribe() -> None:
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks and _subscribers.get(loop) is callbacks:
            del _subscribers[loop]
            if not loop.is_closed():
                loop.remove_signal_handler(signal.SIGHUP)

    return unsubscribe


def _dispatch(loop: asyncio.AbstractEventLoop) -> None:
    for callback in list(_subscribers.get(loop, ())):
        callback()
