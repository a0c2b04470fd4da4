"""EmulatedFleet: N emulated pods as separate processes on 127.0.0.1, and their kvroute config.

`async with EmulatedFleet(pods=3) as fleet:` starts every pod (`python -m router.emulator pod
--port 0 ...`), reads each one's ready line (the ports it bound), waits until every `/health`
answers 200, and on exit stops them all (SIGTERM, then SIGKILL after a grace period). Pods also
get SIGTERM if the fleet's process dies (Linux parent-death signal), so none outlive it.

`config_yaml()` is a kvroute config whose `pods:` list names each pod with its role, model,
adapters and KV-event endpoints (`router.config.load_config` reads it as is); with a
`--tokenizer`, a `blocks:` section puts the router in token mode on the same file. Its
`events:` section says how the router gets the events: `connect` (a SUB per pod, to each
pod's bound PUB) or, with `events_connect`, `bind` on that address (the pods connect to it,
with topics `kv@<endpoint>@<model>` so the one socket tells them apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from argparse import ArgumentParser, Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from router.blocks import BUNDLED_TOKENIZER

EventsMode = Literal["bind", "connect", "none"]
#: Topic of pods that connect to the router's SUB (llm-d's convention; the router's bind mode
#: learns the pod from it).
CONNECT_TOPIC = "kv@{endpoint}@{model}"


class FleetError(RuntimeError):
    """A pod did not start (its exit code and last output are in the message)."""


@dataclass(frozen=True, slots=True)
class FleetPod:
    endpoint: str
    role: str
    model: str
    adapters: tuple[str, ...]
    side_channel: str
    #: host:port of the pod's admin app (`/admin/faults`); None unless the fleet has `admin`.
    admin: str | None
    kv_events_endpoint: str | None
    kv_replay_endpoint: str | None
    block_size: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def admin_url(self) -> str:
        if self.admin is None:
            raise RuntimeError("the fleet was started without admin=True: pods have no admin")
        return f"http://{self.admin}"


def parse_pd(text: str, pods: int) -> tuple[int, int]:
    """ "P:D" → (P, D), checking that P + D equals the pod count."""
    try:
        p_text, d_text = text.split(":")
        p, d = int(p_text), int(d_text)
    except ValueError:
        raise ValueError(f"--pd must be P:D (two integers), got {text!r}") from None
    if p < 1 or d < 1 or p + d != pods:
        raise ValueError(f"--pd {text}: need P >= 1, D >= 1 and P + D = --pods ({pods})")
    return p, d


def pod_args_from(args: Namespace) -> list[str]:
    """The shared pod options of a parsed `emulate fleet` command line, as pod CLI arguments."""
    from router.emulator.cli import add_pod_arguments

    parser = ArgumentParser(add_help=False)
    add_pod_arguments(parser, fleet=True)
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:
            out.append(flag)
        elif isinstance(value, list):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _die_with_parent() -> None:
    """preexec: SIGTERM this child when the parent dies (PR_SET_PDEATHSIG, Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class EmulatedFleet:
    def __init__(
        self,
        pods: int,
        *,
        pd: tuple[int, int] | None = None,
        base_port: int | None = None,
        events: EventsMode = "bind",
        events_connect: str | None = None,
        pod_args: list[str] | None = None,
        speedup: float | None = None,
        profile: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 60.0,
        stderr: int | None = None,
        admin: bool = False,
    ) -> None:
        """`admin`: every pod serves `/admin/faults` on an admin port of its own (never on
        its API port); without it no pod has an admin surface."""
        if pods < 1:
            raise ValueError("a fleet needs at least one pod")
        if pd is not None and sum(pd) != pods:
            raise ValueError(f"pd {pd} does not add up to {pods} pods")
        if events == "connect" and not events_connect:
            raise ValueError("events='connect' needs events_connect (the router's SUB address)")
        self.size = pods
        self.pd = pd
        self.base_port = base_port
        self.events = events
        self.events_connect = events_connect
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.stderr = stderr
        args = list(pod_args or [])
        if speedup is not None:
            args += ["--speedup", str(speedup)]
        if profile is not None:
            args += ["--profile", profile]
        self.pod_args = args
        self.admin = admin
        self.pods: list[FleetPod] = []
        self._procs: list[asyncio.subprocess.Process] = []

    def _role(self, i: int) -> str:
        if self.pd is None:
            return "both"
        return "prefill" if i < self.pd[0] else "decode"

    def _command(self, i: int) -> list[str]:
        port = self.base_port + i if self.base_port is not None else 0
        cmd = [
            sys.executable,
            "-m",
            "router.emulator",
            "pod",
            "--host",
            self.host,
            "--port",
            str(port),
            "--role",
            self._role(i),
        ]
        if self.admin:
            cmd += ["--admin-port", "0"]
        if self.events == "bind":
            cmd += ["--events-bind", f"tcp://{self.host}:0"]
        elif self.events == "connect":
            assert self.events_connect is not None
            cmd += ["--events-connect", self.events_connect, "--events-topic", CONNECT_TOPIC]
        return cmd + self.pod_args

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            for i in range(self.size):
                proc = await asyncio.create_subprocess_exec(
                    *self._command(i),
                    env=_child_env(),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=self.stderr,
                    stdin=asyncio.subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
                self._procs.append(proc)
            infos = await asyncio.wait_for(
                asyncio.gather(*(self._ready_line(p) for p in self._procs)),
                self.startup_timeout_s,
            )
            self.pods = [
                FleetPod(
                    endpoint=info["endpoint"],
                    role=info["role"],
                    model=info["model"],
                    adapters=tuple(info["adapters"]),
                    side_channel=info["side_channel"],
                    admin=info.get("admin"),
                    kv_events_endpoint=info["kv_events_endpoint"],
                    kv_replay_endpoint=info["kv_replay_endpoint"],
                    block_size=info["block_size"],
                    pid=proc.pid,
                )
                for info, proc in zip(infos, self._procs, strict=True)
            ]
            await self._wait_healthy()
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise FleetError(f"pods not ready within {self.startup_timeout_s:.0f}s") from None
            raise

    async def _ready_line(self, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        seen: list[str] = []
        while True:
            line = await proc.stdout.readline()
            if not line:
                code = await proc.wait()
                tail = " | ".join(seen[-3:])
                raise FleetError(f"pod process {proc.pid} exited with {code} before ready {tail}")
            text = line.decode(errors="replace").strip()
            seen.append(text)
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    info = json.loads(text)
                    if info.get("event") == "ready":
                        return info

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            for pod in self.pods:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{pod.url}/health")).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise FleetError(f"pod {pod.endpoint} never answered /health with 200")
                    await asyncio.sleep(0.05)

    async def stop(self, grace_s: float = 5.0) -> None:
        procs, self._procs = self._procs, []
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()

    async def __aenter__(self) -> EmulatedFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        pods = []
        for pod in self.pods:
            entry: dict[str, Any] = {
                "endpoint": pod.endpoint,
                "role": pod.role,
                "models": [pod.model],
                "kv_events_endpoint": pod.kv_events_endpoint,
                "kv_replay_endpoint": pod.kv_replay_endpoint,
            }
            if pod.adapters:
                entry["adapters"] = list(pod.adapters)
            pods.append(entry)
        doc: dict[str, Any] = {"pods": pods}
        if self.events == "connect":
            doc["events"] = {"mode": "bind", "endpoint": self.events_connect}
        elif self.events == "bind":
            doc["events"] = {"mode": "connect"}
        tokenizer = _option(self.pod_args, "--tokenizer") or BUNDLED_TOKENIZER
        if tokenizer != "builtin":
            doc["blocks"] = {
                "mode": "tokens",
                "tokenizer_path": os.path.abspath(tokenizer),
                "block_size": self.pods[0].block_size if self.pods else 16,
                "seed": int(_option(self.pod_args, "--seed") or 0),
            }
        return doc

    def config_yaml(self) -> str:
        header = "# kvroute config written by `kvroute emulate fleet` for its emulated pods\n"
        return header + yaml.safe_dump(self.config(), sort_keys=False)

    def write_config(self, path: str | Path) -> None:
        Path(path).write_text(self.config_yaml())


def _child_env() -> dict[str, str]:
    """The environment with this `router` package first on the path of the pod processes."""
    import router

    root = str(Path(router.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _option(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == flag:
            return args[i + 1]
    return None
