"""`kvroute proxy --workers N`: N proxy processes serving one port, under one supervisor.

The parent binds the listening socket once and hands the same file descriptor to every worker
(`--listen-fd`); the workers accept from that one queue. Why a shared socket rather than one
SO_REUSEPORT socket per worker: a worker that dies takes no queued connection with it (the
queue belongs to the socket the parent keeps open), and its replacement needs no re-bind. The
socket still sets SO_REUSEPORT so a second supervisor (e.g. a rolling restart) can bind the
same port alongside.

Each worker is a fresh interpreter (`python -m router.cli proxy ... --listen-fd FD`) that loads
the same config file, so a `shared_state:` section reaches every worker the same way; without
one, each worker routes on its own state (its own prefix index and in-flight counts).

The supervisor restarts a worker that exits on its own, with exponential backoff (reset once
a worker has stayed up for `STABLE_AFTER_S`), and on SIGTERM/SIGINT sends SIGTERM to every
worker, waits for their graceful stop and exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvroute.proxy.workers")

#: Backoff before restarting a worker that died: first delay, cap, and how long a worker must
#: have lived for the next death to start again from the first delay.
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0
#: How long stopping waits for workers to finish (uvicorn's graceful shutdown is 5 s).
STOP_GRACE_S = 10.0
#: Response header naming the worker process that served a request (with --workers > 1).
WORKER_HEADER = b"x-kvroute-worker"


def bind_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening TCP socket the workers share (inheritable, so it survives exec)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted sockets inherit it (see RunningServer): no delayed-ACK stalls on responses.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def listener_from_fd(fd: int) -> socket.socket:
    """The shared listening socket a worker was handed by its supervisor."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def die_with_supervisor() -> None:
    """Have the kernel send this worker SIGTERM when its supervisor dies (Linux prctl), so a
    SIGKILLed supervisor leaves no worker serving on its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_PR_SET_PDEATHSIG = 1


class WorkerHeader:
    """ASGI wrapper adding `x-kvroute-worker: PID` to every HTTP response.

    Lets a client (and the tests) see which worker answered; lifespan and other scopes pass
    through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._value = str(os.getpid()).encode()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (WORKER_HEADER, self._value)]
            await send(message)

        await self.app(scope, receive, send_tagged)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    next_start_at: float = 0.0
    backoff_s: float = 0.0


@dataclass
class Supervisor:
    """Runs `n` workers on `sock` until a signal; `worker_argv` is the `kvroute proxy` argv
    without the program name (the supervisor appends `--listen-fd FD`)."""

    n: int
    sock: socket.socket
    worker_argv: Sequence[str]
    workers: list[_Worker] = field(default_factory=list)
    restarts: int = 0
    _stopping: bool = False

    def command(self) -> list[str]:
        fd = str(self.sock.fileno())
        return [sys.executable, "-m", "router.cli", *self.worker_argv, "--listen-fd", fd]

    def _start(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(self.command(), pass_fds=(self.sock.fileno(),))
        w.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def _on_signal(self, sig: int, _frame: Any) -> None:
        if not self._stopping:
            log.info("%s: stopping %d workers", signal.Signals(sig).name, self.n)
        self._stopping = True

    def run(self, poll_s: float = 0.05) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.workers = [_Worker(i) for i in range(self.n)]
        for w in self.workers:
            self._start(w)
        while not self._stopping:
            now = time.monotonic()
            for w in self.workers:
                if w.proc is not None and (code := w.proc.poll()) is not None:
                    self._schedule_restart(w, code, now)
                if w.proc is None and now >= w.next_start_at and not self._stopping:
                    self._start(w)
                    self.restarts += 1
            time.sleep(poll_s)
        self._stop_all()
        return 0

    def _schedule_restart(self, w: _Worker, code: int, now: float) -> None:
        assert w.proc is not None
        lived = now - w.started_at
        if lived >= STABLE_AFTER_S:
            w.backoff_s = 0.0
        w.backoff_s = BACKOFF_FIRST_S if w.backoff_s == 0.0 else min(w.backoff_s * 2, BACKOFF_MAX_S)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        log.warning(
            "worker %d (pid %d) died (%s) after %.1f s; restarting in %.1f s",
            w.index,
            w.proc.pid,
            how,
            lived,
            w.backoff_s,
        )
        w.proc = None
        w.next_start_at = now + w.backoff_s

    def _stop_all(self) -> None:
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker pid %d did not stop in %.0f s; killing it", proc.pid, STOP_GRACE_S
                )
                proc.kill()
                proc.wait()
        self.sock.close()
        log.info("all workers stopped")
