"""Chaos run and soak: what each face of kvroute does under steady load while things break.

    python benchmarks/chaos.py --face proxy|extproc|both --soak-s N --json
        [--pods 3] [--concurrency 6] [--hold-s 6] [--settle-s 4] [--faults a,b,...]
        [--deadline-s 60] [--soak-fault-every-s 60] [--speedup 4]

Method. Per face, a fresh emulated fleet (`router/emulator/fleet.py`, every pod with an admin
port for `/admin/faults`; KV events over ZMQ with the router binding one SUB) and the router in
its own process: `kvroute proxy`, or `kvroute serve` behind a real Envoy with the shipped
full-duplex bootstrap. A steady closed loop of `--concurrency` clients sends chat requests
drawn from a multi-turn workload (whole history resent each turn) and from the Mooncake
conversation trace (long prompts; a shared-prompt workload when the trace is absent), half
streamed, half not, each with a deadline (`--deadline-s`). The fault schedule then runs each
fault for `--hold-s`, reverts it and lets the fleet settle for `--settle-s`, one after the
other, then three at once (`overlap`: kill-pod + error-503 + overload):

- kill-pod: SIGKILL of pod 0 mid-stream. Until its restart a "tombstone" listener holds its
  port and counts each connection made to the dead pod (then resets it, as a crashed host
  does), which gives `to_dead_pod`: connections more than `--observe-s` after the first one
  (the first failure is when the router could know);
- restart-empty: pod 0 started again at the same address (same API and admin ports) with an
  empty cache and a KV-event sequence starting over;
- hang-pod: pod 1 stopped with SIGSTOP (the kernel still accepts its connections, nothing
  answers), SIGCONT at the end;
- error-500 / error-503: pod 1 answers every generation request with that status;
- metrics-fail: pod 1's `/metrics` answers 500 while its API keeps serving (the router loses
  that pod's load figures, not the pod);
- kv-seq-reset / kv-gap: pod 0's publisher restarts its sequence at 0 / loses 3 batches;
- overload: 8x `--concurrency` extra clients for the hold time;
- slow-body: 4 clients that send their body one byte every 10 ms (raw socket);
- slow-reader: 4 streaming clients that read one chunk per 100 ms;
- client-disconnect: 8 streaming clients that hang up after the first chunk (counted as
  `aborted`, not failed; what matters is that the router logs no crash and leaks nothing).

Outcomes, per request: completed (200 and a whole answer: a JSON body with choices, or a
stream that ends with `[DONE]`); failed, by HTTP status, by `stream-error` (an error event in
the stream), `truncated` (a 200 stream cut without an error event or `[DONE]`) or `bad-body`;
hung (still open at its deadline: must be 0); lost (the connection to the router closed or
failed before any status line: must be 0). Per fault: `sent`, the requests sent between its
injection and the end of its settle time; `failed`, the failures the clients saw in that time
(so a stream cut by a kill counts for the kill though it was sent before); `recover_s`, from
the injection to the last such failure (0 = no failure); and `e2e_p99_s`, the p99 of the
end-to-end times of the requests sent in it (a hang shows there, not as failures). A fault's
settle time is long enough for the router's scrape-based health (3 failed scrapes at 0.2 s)
to act.

Soak (`--soak-s`, 600 by default; runs on the first face given, after its schedule): the same
load for half the time without faults, then with one fault every `--soak-fault-every-s`,
cycling through `--faults` (a kill followed by its restart; `overlap` left out). Every
10 s: the router process's RSS and open fds (/proc), its index size (proxy: `/debug/pods`
`index_blocks`; picker: blocks stored minus removed from its `/metrics`), and its event-loop
lag, measured from outside as the time `/health` (proxy) or `/metrics` (picker) takes to
answer minus a loopback round trip's floor (the fastest answer seen).

Also reported: the router's log lines that hold a traceback or an ERROR (a routine fault must
not be logged as a crash). Output: a table per face on stdout; `--json` prints one JSON object
instead: {"faces": [{"face", "sent", "completed", "failed": {...}, "hung", "lost",
"to_dead_pod", "aborted", "faults": [{"fault", "failed", "recover_s"}], ...}], "soak": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from envoy_extproc.envoy_process import EnvoyProcess, free_port  # noqa: E402
from router.emulator.fleet import EmulatedFleet, _child_env  # noqa: E402
from router.loadgen import tokens_to_text  # noqa: E402
from router.sim.workloads import LengthDistribution, make_workload  # noqa: E402

FAULTS = (
    "kill-pod",
    "restart-empty",
    "hang-pod",
    "error-500",
    "error-503",
    "metrics-fail",
    "kv-seq-reset",
    "kv-gap",
    "overload",
    "slow-body",
    "slow-reader",
    "client-disconnect",
    "overlap",
)
TRACE = Path("/work/shared/data/mooncake/conversation_trace.jsonl")
_ERROR = re.compile(r"\bERROR\b|\bCRITICAL\b")


_T0 = time.monotonic()


def say(*a: object) -> None:
    """Progress on stderr (stdout carries the table or the JSON)."""
    print(f"[chaos {time.monotonic() - _T0:6.1f}s]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- outcomes
@dataclass(slots=True)
class Outcome:
    sent_at: float
    done_at: float
    #: "ok", "failed", "hung", "lost" or "aborted" (the client hung up on purpose).
    kind: str
    #: For failures: the HTTP status, "stream-error", "truncated", "bad-body", ...
    detail: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        self.outcomes.append(o)

    def summary(self) -> dict[str, Any]:
        kinds = Counter(o.kind for o in self.outcomes)
        failed = Counter(o.detail for o in self.outcomes if o.kind == "failed")
        return {
            "sent": len(self.outcomes),
            "completed": kinds["ok"],
            "failed": dict(sorted(failed.items())),
            "hung": kinds["hung"],
            "lost": kinds["lost"],
            "aborted": kinds["aborted"],
        }


# --------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class Prompt:
    session: str
    text: str


def build_prompts(seed: int, n: int = 120) -> list[Prompt]:
    """Multi-turn turns (history included) and Mooncake-like long prompts, interleaved."""
    multi = make_workload(
        "multi-turn",
        num_requests=n,
        seed=seed,
        first_user=LengthDistribution(400, 0.4, 100, 900),
        user=LengthDistribution(64, 0.6, 16, 256),
        min_turns=2,
        max_turns=5,
    )
    prompts = [Prompt(a.session, tokens_to_text(a.token_ids)) for a in multi.arrivals]
    long: list[Prompt] = []
    if TRACE.exists():
        from router.sim.traces import trace_workload

        trace = trace_workload(str(TRACE), limit=n * 3, seed=seed)
        long = [
            Prompt(a.session, tokens_to_text(a.token_ids))
            for a in trace.arrivals
            if len(a.token_ids) <= 3000
        ][: n // 2]
    if not long:
        shared = make_workload("shared-prompt", num_requests=n // 2, seed=seed, groups=4)
        long = [Prompt(a.session, tokens_to_text(a.token_ids)) for a in shared.arrivals]
    out = []
    for i in range(max(len(prompts), len(long))):
        if i < len(prompts):
            out.append(prompts[i])
        if i < len(long):
            out.append(long[i])
    return out


@dataclass
class Target:
    """Where clients send: the router's HTTP address, the model, request defaults."""

    url: str
    model: str
    deadline_s: float
    max_tokens: int = 24

    def body(self, p: Prompt, stream: bool) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": p.text}],
            "max_tokens": self.max_tokens,
            "stream": stream,
            "user": p.session,
        }


async def send(
    client: httpx.AsyncClient,
    target: Target,
    body: dict[str, Any],
    *,
    read_delay_s: float = 0.0,
    hang_up_after: int | None = None,
) -> Outcome:
    """One request through the router; its outcome as the client saw it."""
    sent = time.monotonic()
    status = 0

    def out(kind: str, detail: str = "") -> Outcome:
        return Outcome(sent, time.monotonic(), kind, detail)

    try:
        async with asyncio.timeout(target.deadline_s):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                status = r.status_code
                if status != 200:
                    await r.aread()
                    return out("failed", str(status))
                if not body.get("stream"):
                    try:
                        data = json.loads(await r.aread())
                    except ValueError:
                        return out("failed", "bad-body")
                    return out("ok") if data.get("choices") else out("failed", "bad-body")
                chunks = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return out("ok")
                    if '"error"' in line:
                        with contextlib.suppress(ValueError):
                            if "error" in json.loads(line[6:]):
                                return out("failed", "stream-error")
                    chunks += 1
                    if hang_up_after is not None and chunks >= hang_up_after:
                        return out("aborted")
                    if read_delay_s:
                        await asyncio.sleep(read_delay_s)
                return out("failed", "truncated")
    except TimeoutError:
        return out("hung")
    except httpx.HTTPError as e:
        # After a status line the client had an answer that broke; before it, none at all.
        return out("failed", "truncated") if status else out("lost", type(e).__name__)


async def send_slow_body(target: Target, body: dict[str, Any], byte_gap_s: float) -> Outcome:
    """A non-streamed request whose body goes out one byte at a time (raw HTTP/1.1)."""
    sent = time.monotonic()
    host, port = target.url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps({**body, "stream": False}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer = None
    try:
        async with asyncio.timeout(target.deadline_s + len(payload) * byte_gap_s):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head)
            for i in range(len(payload)):
                writer.write(payload[i : i + 1])
                await writer.drain()
                await asyncio.sleep(byte_gap_s)
            status_line = await reader.readline()
            rest = await reader.read()
    except TimeoutError:
        return Outcome(sent, time.monotonic(), "hung")
    except OSError as e:
        return Outcome(sent, time.monotonic(), "lost", type(e).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    parts = status_line.split()
    if len(parts) < 2:
        return Outcome(sent, time.monotonic(), "lost", "no-status")
    status = parts[1].decode()
    if status != "200":
        return Outcome(sent, time.monotonic(), "failed", status)
    ok = b'"choices"' in rest
    return Outcome(sent, time.monotonic(), "ok" if ok else "failed", "" if ok else "bad-body")


class Load:
    """A closed loop of clients over the prompt pool, until stopped; every outcome tallied."""

    def __init__(self, target: Target, prompts: list[Prompt], tally: Tally, seed: int) -> None:
        self.target = target
        self.prompts = prompts
        self.tally = tally
        self._rng = random.Random(seed)
        self._next = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(base_url=target.url, timeout=None, limits=limits)

    def next_body(self) -> dict[str, Any]:
        p = self.prompts[self._next % len(self.prompts)]
        self._next += 1
        return self.target.body(p, stream=self._rng.random() < 0.5)

    def start(self, clients: int) -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(self._client()) for _ in range(clients)]
        self._tasks += tasks
        return tasks

    async def _client(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                outcome = await send(self.client, self.target, self.next_body())
            except Exception as e:  # a client-library bug must not silently stop this client
                outcome = Outcome(sent, time.monotonic(), "failed", f"client-{type(e).__name__}")
            self.tally.add(outcome)

    async def stop_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        """Let these clients finish their current request, then stop them."""
        for t in tasks:
            t.cancel()
        # A cancelled request is the harness's doing: it is not counted.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop every client now: requests still open at the end are the harness's doing and
        are not counted (the schedule's last settle time has let the faults' ones finish)."""
        self._stop.set()
        await self.stop_tasks(self._tasks)
        await self.client.aclose()


# --------------------------------------------------------------------------- the fleet
class Tombstone:
    """Holds a dead pod's port: counts connection attempts and resets each one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connects: list[float] = []
        self._server: asyncio.Server | None = None

    async def start(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:  # the port frees once the kernel has torn the killed process down
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        self._server = await asyncio.start_server(self._conn, sock=sock)

    async def _conn(self, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connects.append(time.monotonic())
        sock = w.get_extra_info("socket")
        with contextlib.suppress(OSError):  # linger 0: close with a reset, like a dead host
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        w.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def after_observable(self, observe_s: float) -> int:
        if not self.connects:
            return 0
        first = self.connects[0]
        return sum(1 for t in self.connects if t > first + observe_s)


class Fleet:
    """EmulatedFleet plus the faults that need the pods' processes and addresses."""

    def __init__(self, fleet: EmulatedFleet) -> None:
        self.fleet = fleet
        self.admin = httpx.AsyncClient(timeout=5.0)
        self._drains: list[asyncio.Task[bytes]] = []

    def port(self, i: int) -> int:
        return int(self.fleet.pods[i].endpoint.rsplit(":", 1)[1])

    async def fault(self, i: int, body: dict[str, Any]) -> None:
        r = await self.admin.post(f"{self.fleet.pods[i].admin_url}/admin/faults", json=body)
        r.raise_for_status()

    def kill(self, i: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.fleet.pods[i].pid, signal.SIGKILL)

    def pause(self, i: int, on: bool) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.fleet.pods[i].pid, signal.SIGSTOP if on else signal.SIGCONT)

    async def restart(self, i: int) -> None:
        """Start pod `i` again on its API and admin ports (a fresh engine: empty cache)."""
        old = self.fleet.pods[i]
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            await asyncio.wait_for(self.fleet._procs[i].wait(), 5)
        cmd = self.fleet._command(i)
        cmd[cmd.index("--port") + 1] = str(self.port(i))
        assert old.admin is not None
        cmd[cmd.index("--admin-port") + 1] = old.admin.rsplit(":", 1)[1]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            env=_child_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        self.fleet._procs[i] = proc
        await asyncio.wait_for(self.fleet._ready_line(proc), 60)
        # Read the pod's stdout to its end, so a chatty pod never blocks on a full pipe and
        # the pipe closes with the process.
        assert proc.stdout is not None
        self._drains.append(asyncio.create_task(proc.stdout.read()))
        self.fleet.pods[i] = replace(old, pid=proc.pid)
        await self.fleet._wait_healthy()

    async def close(self) -> None:
        for i in range(len(self.fleet.pods)):
            self.pause(i, False)
        await self.admin.aclose()


# --------------------------------------------------------------------------- the router
@dataclass
class Router:
    """The face under test in its own process; `url` takes client traffic."""

    face: str
    proc: subprocess.Popen[bytes]
    url: str
    probe_url: str
    log_path: Path
    envoy: EnvoyProcess | None = None

    def log_problems(self) -> list[str]:
        """ERROR lines and tracebacks of the router's log (a traceback by its last line)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        out: list[str] = []
        in_tb = False
        for line in text.splitlines():
            if line.startswith("Traceback (most recent call last)"):
                in_tb = True
            elif in_tb and line and not line[0].isspace() and not line.startswith("During"):
                out.append(f"traceback: {line[:200]}")
                in_tb = False
            elif not in_tb and _ERROR.search(line):
                out.append(line[:200])
        return out


def router_config(fleet: EmulatedFleet, events_endpoint: str) -> str:
    doc = fleet.config()
    doc["events"] = {"mode": "bind", "endpoint": events_endpoint}
    return yaml.safe_dump(doc, sort_keys=False)


@contextlib.asynccontextmanager
async def start_router(face: str, fleet: EmulatedFleet, events: str) -> AsyncIterator[Router]:
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{face}-"))
    cfg = workdir / "kvroute.yaml"
    cfg.write_text(router_config(fleet, events))
    log_path = workdir / "router.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    base = [sys.executable, "-m", "router.cli"]
    if face == "proxy":
        port = free_port()
        cmd = [*base, "proxy", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        probe = f"{url}/health"
    else:
        grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
        cmd = [
            *base, "serve", "--config", str(cfg), "--host", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--health-port", str(health_port),
            "--metrics-port", str(metrics_port), "--lame-duck", "0", "--grace-period", "5",
        ]  # fmt: skip
        url = ""
        probe = f"http://127.0.0.1:{metrics_port}/metrics"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    router = Router(face, proc, url, probe, log_path)
    try:
        await _wait_http(probe, proc, log_path)
        if face == "extproc":
            router.envoy = EnvoyProcess("FULL_DUPLEX_STREAMED", grpc_port)
            await router.envoy.start()
            router.url = router.envoy.url
        yield router
    finally:
        say(face, "stopping the router")
        if router.envoy is not None:
            await router.envoy.stop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
        shutil.rmtree(workdir, ignore_errors=True)


async def _wait_http(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"router exited {proc.returncode}: {log_path.read_text()[-800:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"router not ready in 60 s: {log_path.read_text()[-800:]}")


# --------------------------------------------------------------------------- faults
@dataclass
class Chaos:
    fleet: Fleet
    load: Load
    args: argparse.Namespace
    to_dead_pod: int = 0
    #: (fault, injected at, end of its settle time)
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    _dead: Tombstone | None = None

    async def run(self, name: str) -> None:
        """Inject `name`, hold it, revert it, let the fleet settle; record its window."""
        say("fault", name)
        start = time.monotonic()
        hold = self.args.hold_s
        revert = await self.inject(name)
        await asyncio.sleep(hold)
        await revert()
        await asyncio.sleep(self.args.settle_s)
        self.windows.append((name, start, time.monotonic()))

    async def inject(self, name: str) -> Callable[[], Any]:
        f, load, hold = self.fleet, self.load, self.args.hold_s
        if name == "kill-pod":
            f.kill(0)
            self._dead = Tombstone(f.port(0))
            await self._dead.start()

            async def revert() -> None:  # stays dead; restart-empty brings it back
                return None

            return revert
        if name == "restart-empty":
            await self._bury()
            await f.restart(0)
            return _noop
        if name == "hang-pod":
            f.pause(1, True)

            async def revert_pause() -> None:
                f.pause(1, False)

            return revert_pause
        if name in ("error-500", "error-503"):
            await f.fault(1, {"error_rate": 1.0, "error_status": int(name[-3:])})

            async def revert_error() -> None:
                await f.fault(1, {"error_rate": 0.0})

            return revert_error
        if name == "metrics-fail":
            await f.fault(1, {"metrics_error": True})

            async def revert_metrics() -> None:
                await f.fault(1, {"metrics_error": False})

            return revert_metrics
        if name == "kv-seq-reset":
            await f.fault(0, {"reset_kv_event_seq": True})
            return _noop
        if name == "kv-gap":
            await f.fault(0, {"drop_kv_events": 3})
            return _noop
        if name == "overload":
            tasks = load.start(self.args.concurrency * 8)

            async def revert_overload() -> None:
                await load.stop_tasks(tasks)

            return revert_overload
        if name == "slow-body":
            body = load.target.body(Prompt("slow", "a slow client " * 8), stream=False)
            extra = [
                asyncio.create_task(send_slow_body(load.target, body, hold / 600)) for _ in range(4)
            ]

            async def revert_slow() -> None:
                for o in await asyncio.gather(*extra):
                    load.tally.add(o)

            return revert_slow
        if name in ("slow-reader", "client-disconnect"):
            kw: dict[str, Any] = (
                {"read_delay_s": 0.1} if name == "slow-reader" else {"hang_up_after": 1}
            )
            tasks = [
                asyncio.create_task(self._streamed(kw))
                for _ in range(4 if name == "slow-reader" else 8)
            ]

            async def revert_clients() -> None:
                await asyncio.gather(*tasks)

            return revert_clients
        if name == "overlap":
            reverts = [await self.inject(n) for n in ("kill-pod", "error-503", "overload")]

            async def revert_all() -> None:
                for r in reverts:
                    await r()
                await self._bury()
                await f.restart(0)

            return revert_all
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})")

    async def _streamed(self, kw: dict[str, Any]) -> None:
        body = self.load.next_body()
        body["stream"] = True
        self.load.tally.add(await send(self.load.client, self.load.target, body, **kw))

    async def _bury(self) -> None:
        """Close the dead pod's tombstone (so the pod can come back) and count its calls."""
        if self._dead is not None:
            await self._dead.stop()
            self.to_dead_pod += self._dead.after_observable(self.args.observe_s)
            self._dead = None

    def per_fault(self, tally: Tally) -> list[dict[str, Any]]:
        out = []
        for name, start, end in self.windows:
            # By when the client saw the failure: a stream cut by a kill was sent before it.
            failures = [
                o
                for o in tally.outcomes
                if start <= o.done_at < end and o.kind in ("failed", "hung", "lost")
            ]
            last = max((o.done_at for o in failures), default=start)
            e2e = sorted(o.done_at - o.sent_at for o in tally.outcomes if start <= o.sent_at < end)
            out.append(
                {
                    "fault": name,
                    "sent": sum(1 for o in tally.outcomes if start <= o.sent_at < end),
                    "failed": len(failures),
                    "by": dict(Counter(o.detail or o.kind for o in failures)),
                    "recover_s": round(last - start, 2),
                    "e2e_p99_s": round(e2e[int(0.99 * (len(e2e) - 1))], 2) if e2e else None,
                }
            )
        return out


async def _noop() -> None:
    return None


# --------------------------------------------------------------------------- soak sampling
def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def index_size(client: httpx.AsyncClient, router: Router) -> int | None:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        if router.face == "proxy":
            r = await client.get(router.url + "/debug/pods")
            return sum(p["index_blocks"] for p in r.json()["pods"])
        text = (await client.get(router.probe_url)).text
        stored = removed = 0.0
        for line in text.splitlines():
            if line.startswith("kvroute_kv_events_blocks_stored"):
                stored += float(line.split()[-1])
            elif line.startswith("kvroute_kv_events_blocks_removed"):
                removed += float(line.split()[-1])
        return int(stored - removed)
    return None


async def probe_ms(client: httpx.AsyncClient, url: str) -> float | None:
    t = time.perf_counter()
    try:
        await client.get(url)
    except httpx.HTTPError:
        return None
    return (time.perf_counter() - t) * 1e3


async def soak(chaos: Chaos, router: Router, seconds: float, every_s: float) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    probes: list[float] = []
    stop = asyncio.Event()

    async def prober(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            ms = await probe_ms(client, router.probe_url)
            if ms is not None:
                probes.append(ms)
            await asyncio.sleep(0.5)

    async def sampler(client: httpx.AsyncClient) -> None:
        start = time.monotonic()
        while True:
            last = stop.is_set()  # one more sample once the soak is over
            with contextlib.suppress(OSError):
                samples.append(
                    {
                        "t_s": round(time.monotonic() - start, 1),
                        "rss_mb": round(proc_rss_mb(router.proc.pid), 1),
                        "fds": proc_fds(router.proc.pid),
                        "index": await index_size(client, router),
                        "completed": sum(1 for o in chaos.load.tally.outcomes if o.kind == "ok"),
                    }
                )
            if last:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10)

    async with httpx.AsyncClient(timeout=10.0) as client:
        tasks = [asyncio.create_task(prober(client)), asyncio.create_task(sampler(client))]
        quiet = seconds / 2
        await asyncio.sleep(quiet)
        end = time.monotonic() + seconds - quiet
        i = 0
        cycle = [f for f in chaos.args.faults if f not in ("restart-empty", "overlap")]
        cycle = cycle or ["kill-pod"]
        while time.monotonic() < end:
            name = cycle[i % len(cycle)]
            i += 1
            t0 = time.monotonic()
            await chaos.run(name)
            if name == "kill-pod":
                await chaos.run("restart-empty")
            await asyncio.sleep(
                max(0.0, min(every_s - (time.monotonic() - t0), end - time.monotonic()))
            )
        stop.set()
        await asyncio.gather(*tasks)
    floor = min(probes) if probes else 0.0
    lags = sorted(p - floor for p in probes)
    after_1min = [s for s in samples if s["t_s"] >= 60] or samples
    return {
        "face": router.face,
        "seconds": round(seconds),
        "rss_mb_start": samples[0]["rss_mb"] if samples else None,
        "rss_mb_1min": after_1min[0]["rss_mb"] if after_1min else None,
        "rss_mb_end": samples[-1]["rss_mb"] if samples else None,
        "fds_start": samples[0]["fds"] if samples else None,
        "fds_end": samples[-1]["fds"] if samples else None,
        "fds_max": max((s["fds"] for s in samples), default=None),
        "index_start": samples[0]["index"] if samples else None,
        "index_end": samples[-1]["index"] if samples else None,
        "index_max": max((s["index"] or 0 for s in samples), default=None),
        "loop_lag_p99_ms": round(lags[int(0.99 * (len(lags) - 1))], 2) if lags else None,
        "loop_lag_median_ms": round(statistics.median(lags), 2) if lags else None,
        "samples": samples,
    }


# --------------------------------------------------------------------------- one face
async def run_face(
    face: str, args: argparse.Namespace, prompts: list[Prompt], soak_s: float
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    events = f"tcp://127.0.0.1:{free_port()}"
    pod_args = ["--seed", str(args.seed)]
    async with EmulatedFleet(
        pods=args.pods,
        events="connect",
        events_connect=events,
        pod_args=pod_args,
        speedup=args.speedup,
        admin=True,
        stderr=subprocess.DEVNULL,
    ) as emulated:
        fleet = Fleet(emulated)
        say(face, f"fleet of {args.pods} pods up")
        async with start_router(face, emulated, events) as router:
            say(face, "router up at", router.url)
            tally = Tally()
            target = Target(router.url, emulated.pods[0].model, args.deadline_s)
            load = Load(target, prompts, tally, args.seed)
            chaos = Chaos(fleet, load, args)
            try:
                load.start(args.concurrency)
                await asyncio.sleep(args.warmup_s)
                faults = args.faults
                for name in faults:
                    if name == "restart-empty" and "kill-pod" not in faults:
                        continue  # only meaningful after a kill
                    await chaos.run(name)
                if chaos._dead is not None:  # a kill without restart in the list
                    await chaos.run("restart-empty")
                scheduled = len(chaos.windows)
                soak_report = None
                if soak_s:
                    soak_report = await soak(chaos, router, soak_s, args.soak_fault_every_s)
            finally:
                await load.close()
                await chaos._bury()
                await fleet.close()
            summary = tally.summary()
            report = {
                "face": face,
                **summary,
                "to_dead_pod": chaos.to_dead_pod,
                "faults": chaos.per_fault(tally)[:scheduled],
                "router_log_problems": router.log_problems()[:20],
            }
            if soak_report is not None:
                soak_report["faults"] = chaos.per_fault(tally)[scheduled:]
        say(face, "router stopped; stopping the fleet")
        await emulated.stop(grace_s=2.0)
        with contextlib.suppress(TimeoutError):  # restarted pods' stdout, at EOF now
            await asyncio.wait_for(asyncio.gather(*fleet._drains, return_exceptions=True), 5)
    say(face, "done")
    return report, soak_report


# --------------------------------------------------------------------------- output
def format_table(report: dict[str, Any]) -> str:
    lines = []
    for f in report["faces"]:
        failed = ", ".join(f"{k}: {v}" for k, v in f["failed"].items()) or "-"
        lines.append(
            f"{f['face']}: sent {f['sent']}  completed {f['completed']}  failed {{{failed}}}  "
            f"hung {f['hung']}  lost {f['lost']}  to_dead_pod {f['to_dead_pod']}  "
            f"aborted {f['aborted']}  router log problems {len(f['router_log_problems'])}"
        )
        lines.append(f"  {'fault':<18} {'sent':>5} {'failed':>6} {'recover_s':>9} {'p99_s':>6}  by")
        for x in f["faults"]:
            by = ", ".join(f"{k}: {v}" for k, v in x["by"].items()) or "-"
            p99 = "-" if x["e2e_p99_s"] is None else f"{x['e2e_p99_s']:.2f}"
            lines.append(
                f"  {x['fault']:<18} {x['sent']:>5} {x['failed']:>6} {x['recover_s']:>9.2f} "
                f"{p99:>6}  {by}"
            )
    s = report.get("soak")
    if s:
        lines.append(
            f"soak ({s['face']}, {s['seconds']} s): RSS {s['rss_mb_start']} -> "
            f"{s['rss_mb_1min']} (1 min) -> {s['rss_mb_end']} MB, fds {s['fds_start']} -> "
            f"{s['fds_end']} (max {s['fds_max']}), index {s['index_start']} -> {s['index_end']} "
            f"(max {s['index_max']}), loop lag p99 {s['loop_lag_p99_ms']} ms"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--face", choices=("proxy", "extproc", "both"), default="both")
    p.add_argument("--soak-s", type=float, default=600.0)
    p.add_argument("--soak-fault-every-s", type=float, default=60.0)
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    p.add_argument("--pods", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--hold-s", type=float, default=6.0)
    p.add_argument("--settle-s", type=float, default=4.0)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--deadline-s", type=float, default=60.0)
    p.add_argument("--observe-s", type=float, default=1.0)
    p.add_argument("--speedup", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default all: {','.join(FAULTS)})",
    )
    args = p.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown:
        p.error(f"unknown fault(s) {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    if args.pods < 2:
        p.error("--pods must be >= 2 (the faults use pods 0 and 1)")
    return args


async def chaos_main(args: argparse.Namespace) -> dict[str, Any]:
    prompts = build_prompts(args.seed)
    faces = ["proxy", "extproc"] if args.face == "both" else [args.face]
    out: dict[str, Any] = {"faces": [], "soak": None}
    for i, face in enumerate(faces):
        report, soak_report = await run_face(face, args, prompts, args.soak_s if i == 0 else 0)
        out["faces"].append(report)
        if soak_report is not None:
            out["soak"] = soak_report
    out["machine"] = {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(chaos_main(args))
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    bad = any(f["hung"] or f["lost"] for f in report["faces"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
