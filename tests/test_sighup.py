"""One SIGHUP reaches every subscriber (asyncio alone keeps only the last handler)."""

from __future__ import annotations

import asyncio
import os
import signal

from router.sighup import subscribe_sighup


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "no SIGHUP delivered"
        await asyncio.sleep(0.01)


async def test_every_subscriber_hears_sighup_and_the_last_unsubscribe_uninstalls() -> None:
    heard: list[str] = []
    stop_config = subscribe_sighup(lambda: heard.append("config"))
    stop_pods = subscribe_sighup(lambda: heard.append("pods"))
    assert stop_config is not None and stop_pods is not None
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: len(heard) == 2)
        assert sorted(heard) == ["config", "pods"]
        stop_config()
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: len(heard) == 3)
        assert heard[2] == "pods"
    finally:
        stop_config()
        stop_pods()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
