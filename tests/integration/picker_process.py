"""PickerProcess: `kvroute serve` as a real child process, for faults a process suffers.

SIGKILL and SIGTERM need a process of their own (the in-process `PickerServer` cannot be
killed without killing the test). `start()` waits for the "ext_proc :PORT" log line and the
readiness check; stderr is drained in the background (kept in `log`) so the pipe never fills;
`kill()` / `terminate()` send the signals; `stop()` makes sure nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class PickerProcess:
    config: Path
    grpc_port: int
    health_port: int
    metrics_port: int
    lame_duck_s: float = 0.0
    grace_s: float = 5.0
    log: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    _drain: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 20.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--config",
            str(self.config),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--health-port",
            str(self.health_port),
            "--metrics-port",
            str(self.metrics_port),
            "--lame-duck",
            str(self.lame_duck_s),
            "--grace-period",
            str(self.grace_s),
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        started = asyncio.Event()
        self._drain = asyncio.create_task(self._read_log(started))
        try:
            async with asyncio.timeout(timeout_s):
                await started.wait()
                while await self.readiness() != SERVING:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            await self.stop()
            raise TimeoutError("kvroute serve not ready:\n" + "".join(self.log)) from None

    async def _read_log(self, started: asyncio.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := (await self.proc.stderr.readline()).decode(errors="replace"):
            self.log.append(line)
            if "ext_proc :" in line:
                started.set()
        if not started.is_set():
            raise RuntimeError("kvroute serve exited before it was ready:\n" + "".join(self.log))

    async def readiness(self) -> int | None:
        """The `readiness` health status, or None when the health port does not answer."""
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                req = health_pb2.HealthCheckRequest(service="readiness")
                return int((await stub.Check(req, timeout=1)).status)
        except grpc.aio.AioRpcError:
            return None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.returncode is None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()

    async def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, sockets closed by the kernel."""
        self.signal(signal.SIGKILL)
        await self.wait()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain
            self._drain = None

    async def __aenter__(self) -> PickerProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
