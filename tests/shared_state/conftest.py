"""A real `redis-server` on a free loopback port for the whole directory, and helpers.

The server runs without persistence (`--save '' --appendonly no`), so a restart comes back
empty, as a store that lost its memory would. Tests that kill it restart it on the same port
before they end (`RedisServer.restart`), so the next test finds it up.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from router.config import RouterConfig, parse_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(binary, free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The session's server, running (restarted if a previous test left it down)."""
    if not redis_server.running:
        redis_server.start()
    return redis_server


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own (tests share one server)."""
    return f"t{uuid.uuid4().hex[:8]}"


def replica_config(
    pods: list[str],
    url: str,
    prefix: str,
    mode: str = "approximate",
    lease_s: float = 1.5,
    extra: str = "",
) -> RouterConfig:
    lines = ["pods:"]
    lines += [f"  - {{endpoint: '{ep}', models: [m]}}" for ep in pods]
    lines.append("blocks: {mode: chars, chars_per_block: 16}")
    lines.append(f"prefix_index: {{mode: {mode}}}")
    lines.append(
        f"shared_state: {{url: '{url}', prefix: {prefix}, lease_s: {lease_s}, "
        "heartbeat_s: 0.2, retry_s: 0.2}"
    )
    lines.append("seed: 3")
    return parse_config("\n".join(lines) + "\n" + extra, "<test>")


async def wait_for(
    predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition"
) -> float:
    """Seconds until `predicate()` held; AssertionError after `timeout_s`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0
