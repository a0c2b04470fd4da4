"""The routers `compare.py` puts side by side: how to start each one, and what it costs.

A `RouterSpec` turns a fleet (pod URLs, KV-event endpoints, a kvroute config) and a free port
into a command line; `RouterProcess` starts it on 127.0.0.1, waits until it answers, samples
its CPU time and resident memory from `/proc` (the process and all its descendants) while it
runs, and stops it. The peers are the PyPI packages `sglang-router` (launched as
`python -m sglang_router.launch_router`) and `vllm-router` (a binary on PATH); a peer whose
package is not installed is reported as missing rather than failing the comparison.

CPU seconds are utime + stime of every live process of the tree plus what its reaped children
left in cutime + cstime, read just before the router is stopped. Peak RSS is the largest sum
of `VmRSS` over the tree seen by a sampler that reads `/proc` every `sample_s`.

Pinning (`cpus=`): every thread of the router's tree is bound to those cores right after the
start (threads and processes it makes later inherit the binding), again once it answers (for
threads a fast-starting binary made in between), and the cores its threads were allowed at
the end are recorded, so a run can show it really was confined. `kvroute-sglang-cache-aware`
and `kvroute-vllm-kv-aware` run kvroute with the peer policies' example configs
(`configs/policies/`), for the validation against the real peers (`validate_peers.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from router.blocks import BUNDLED_TOKENIZER
from router.config import DEFAULT_PLUGINS_YAML, parse_config

REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- /proc accounting
def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [
                    int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                ]
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces) start at index 2 of `man 5 proc`.
    return text[text.rindex(")") + 2 :].split()


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of the tree, plus cutime + cstime of reaped children."""
    ticks = 0
    for p in process_tree(pid):
        f = _stat_fields(p)
        if f is not None:
            # utime, stime, cutime, cstime are fields 14..17 (1-based); f[0] is field 3.
            ticks += sum(int(x) for x in f[11:15])
    return ticks / _CLK_TCK


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


# --------------------------------------------------------------------------- pinning
def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as taskset and /proc write it ("0", "1,3", "0-2,5") → the set of cores."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"not a CPU list: {text!r} (want e.g. 0 or 0-1,3)") from None
        if a < 0 or b < a:
            raise ValueError(f"not a CPU list: {text!r} (want e.g. 0 or 0-1,3)")
        cpus.update(range(a, b + 1))
    return frozenset(cpus)


def format_cpus(cpus: frozenset[int] | set[int]) -> str:
    """The inverse of `parse_cpus`, with runs collapsed ({0, 1, 2, 5} → "0-2,5")."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _threads(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    return []


def _each_thread(pid: int, apply: Callable[[int], object]) -> int:
    """Call `apply(tid)` for every thread of `pid` and its descendants; how many succeeded
    (threads that exit meanwhile are skipped)."""
    done = 0
    for p in process_tree(pid):
        for tid in _threads(p):
            with contextlib.suppress(OSError):
                apply(tid)
                done += 1
    return done


def pin_tree(pid: int, cpus: frozenset[int]) -> int:
    """Bind every thread of `pid` and its descendants to `cpus`; the number of threads bound."""
    return _each_thread(pid, lambda tid: os.sched_setaffinity(tid, cpus))


def renice_tree(pid: int, nice: int) -> int:
    """Set the nice value of every thread of `pid` and its descendants (Linux keeps one per
    thread); the number of threads set. Threads under SCHED_IDLE keep their policy."""
    return _each_thread(pid, lambda tid: os.setpriority(os.PRIO_PROCESS, tid, nice))


def tree_affinity(pid: int) -> frozenset[int]:
    """The cores any thread of the tree may run on (the union of their affinities)."""
    out: set[int] = set()
    for p in process_tree(pid):
        for tid in _threads(p):
            with contextlib.suppress(OSError):
                out |= os.sched_getaffinity(tid)
    return frozenset(out)


# --------------------------------------------------------------------------- what to start
@dataclass(frozen=True, slots=True)
class FleetView:
    """What a router needs to know about the fleet it fronts."""

    urls: tuple[str, ...]
    #: pod URL → its bound KV-event PUB endpoint (pods publish the map wire form, empty topic).
    kv_events: dict[str, str]
    #: A kvroute config for the fleet, with the default profile and a `round-robin` profile.
    kvroute_config: str
    #: The same fleet keyed by characters with the approximate index (no KV events, no
    #: tokenizer): what `kvroute-approx` runs. None = that router cannot run here.
    kvroute_approx_config: str | None = None
    block_size: int = 16
    tokenizer_dir: str = str(Path(BUNDLED_TOKENIZER).parent)
    #: The fleet's kvroute config as a document (pods, blocks): what the policy routers start
    #: from. None = they cannot run here.
    fleet_doc: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RouterSpec:
    name: str
    #: (fleet, port, workdir) → argv.
    command: Callable[[FleetView, int, Path], list[str]]
    #: None when installed; else why it cannot run here.
    missing: Callable[[], str | None] = lambda: None
    ready_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)


def _kvroute(profile: str, approx: bool = False) -> Callable[[FleetView, int, Path], list[str]]:
    def command(fleet: FleetView, port: int, workdir: Path) -> list[str]:
        path = workdir / "kvroute.yaml"
        config = fleet.kvroute_approx_config if approx else fleet.kvroute_config
        if config is None:
            raise RouterError("no character-mode kvroute config for this fleet")
        path.write_text(config)
        # The chat template beside the tokenizer the pods use, so chats render (and key) alike.
        template = Path(fleet.tokenizer_dir) / "tokenizer_config.json"
        return [
            sys.executable, "-m", "router.cli", "proxy", "--config", str(path),
            "--port", str(port), "--profile", profile, "--log-level", "warning",
            *(["--chat-template", str(template)] if template.exists() else []),
        ]  # fmt: skip

    return command


POLICY_DIR = REPO / "configs" / "policies"


def policy_config(fleet_doc: dict[str, Any], policy: str) -> str:
    """The fleet's config with the plugins, profiles and index settings of
    `configs/policies/<policy>.yaml` (its example pods replaced by the fleet's). The fleet's
    own `blocks:` (token mode, the pods' block size and seed) wins, so keys match the pods'
    KV events; a policy that routes on text alone gets character blocks (no tokenizer)."""
    path = POLICY_DIR / f"{policy}.yaml"
    try:
        policy_doc = yaml.safe_load(path.read_text())
    except OSError as e:
        known = sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))
        raise RouterError(f"no policy config {path} ({e.strerror}); known: {known}") from None
    doc = {k: v for k, v in policy_doc.items() if k not in ("pods", "blocks")}
    doc["pods"] = fleet_doc["pods"]
    uses_blocks = policy_doc.get("blocks") is not None or "prefix_index" in policy_doc
    if uses_blocks and "blocks" in fleet_doc:
        doc["blocks"] = fleet_doc["blocks"]
    else:
        doc["blocks"] = {"mode": "chars"}
    text = yaml.safe_dump({**doc, "proxy": PROXY_TIMEOUTS, "seed": 1}, sort_keys=False)
    parse_config(text, f"<compare {policy} config>")
    return text


def _kvroute_policy(policy: str) -> Callable[[FleetView, int, Path], list[str]]:
    def command(fleet: FleetView, port: int, workdir: Path) -> list[str]:
        if fleet.fleet_doc is None:
            raise RouterError("no fleet document for a policy config")
        path = workdir / "kvroute.yaml"
        path.write_text(policy_config(fleet.fleet_doc, policy))
        template = Path(fleet.tokenizer_dir) / "tokenizer_config.json"
        return [
            sys.executable, "-m", "router.cli", "proxy", "--config", str(path),
            "--port", str(port), "--log-level", "warning",
            *(["--chat-template", str(template)] if template.exists() else []),
        ]  # fmt: skip

    return command


def _policy_missing(policy: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        if not (POLICY_DIR / f"{policy}.yaml").exists():
            return f"configs/policies/{policy}.yaml does not exist"
        return None

    return missing


#: sglang-router's `cache_aware` parameters, passed explicitly so both sides run the same
#: ones: its CLI defaults, as `configs/policies/sglang-cache-aware.yaml` sets them.
SGLANG_CACHE_AWARE_ARGS = (
    "--cache-threshold", "0.3", "--balance-abs-threshold", "64",
    "--balance-rel-threshold", "1.5", "--eviction-interval-secs", "60",
    "--max-tree-size", str(2**26),
)  # fmt: skip


def _sglang(policy: str) -> Callable[[FleetView, int, Path], list[str]]:
    def command(fleet: FleetView, port: int, workdir: Path) -> list[str]:
        return [
            sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(port), "--policy", policy, "--prometheus-port", str(free_port()),
            "--prometheus-host", "127.0.0.1", "--log-level", "warn",
            *(SGLANG_CACHE_AWARE_ARGS if policy == "cache_aware" else ()),
            "--worker-urls", *fleet.urls,
        ]  # fmt: skip

    return command


def _vllm(policy: str) -> Callable[[FleetView, int, Path], list[str]]:
    def command(fleet: FleetView, port: int, workdir: Path) -> list[str]:
        cmd = [
            vllm_router_binary() or "vllm-router", "--host", "127.0.0.1", "--port", str(port),
            "--policy", policy, "--prometheus-port", str(free_port()),
            "--prometheus-host", "127.0.0.1", "--log-level", "warning",
            "--worker-urls", *fleet.urls,
        ]  # fmt: skip
        if policy == "kv_aware":
            cmd += [
                "--kv-event-block-size", str(fleet.block_size),
                "--kv-event-model", fleet.tokenizer_dir,
            ]  # fmt: skip
            for url, endpoint in fleet.kv_events.items():
                cmd += ["--kv-event-source", f"{url}={endpoint}"]
        return cmd

    return command


def vllm_router_binary() -> str | None:
    """`vllm-router` on PATH, or beside this interpreter (an unactivated venv)."""
    found = shutil.which("vllm-router")
    if found:
        return found
    beside = Path(sys.executable).parent / "vllm-router"
    return str(beside) if beside.exists() else None


def _sglang_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("sglang_router") is None:
        return "sglang-router is not installed (pip install -e '.[bench]')"
    return None


def _vllm_missing() -> str | None:
    return (
        None if vllm_router_binary() else "vllm-router is not installed (pip install -e '.[bench]')"
    )


_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RUST_LOG": "warn"}

ROUTERS: dict[str, RouterSpec] = {
    "kvroute": RouterSpec("kvroute", _kvroute("default"), ready_path="/ready"),
    "kvroute-approx": RouterSpec(
        "kvroute-approx", _kvroute("default", approx=True), ready_path="/ready"
    ),
    "kvroute-round-robin": RouterSpec(
        "kvroute-round-robin", _kvroute("round-robin"), ready_path="/ready"
    ),
    "sglang-cache_aware": RouterSpec(
        "sglang-cache_aware", _sglang("cache_aware"), _sglang_missing, env=_OFFLINE
    ),
    "sglang-round_robin": RouterSpec(
        "sglang-round_robin", _sglang("round_robin"), _sglang_missing, env=_OFFLINE
    ),
    "vllm-cache_aware": RouterSpec(
        "vllm-cache_aware", _vllm("cache_aware"), _vllm_missing, env=_OFFLINE
    ),
    "vllm-kv_aware": RouterSpec("vllm-kv_aware", _vllm("kv_aware"), _vllm_missing, env=_OFFLINE),
    # The peers' policies re-implemented in kvroute (validated against the two above).
    "kvroute-sglang-cache-aware": RouterSpec(
        "kvroute-sglang-cache-aware",
        _kvroute_policy("sglang-cache-aware"),
        _policy_missing("sglang-cache-aware"),
        ready_path="/ready",
    ),
    "kvroute-vllm-kv-aware": RouterSpec(
        "kvroute-vllm-kv-aware",
        _kvroute_policy("vllm-kv-aware"),
        _policy_missing("vllm-kv-aware"),
        ready_path="/ready",
    ),
}


# --------------------------------------------------------------------------- running one
@dataclass(slots=True)
class Usage:
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0
    #: The cores the tree's threads were allowed on at the end (empty = not read).
    cpus: frozenset[int] = frozenset()

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 2**20


class RouterError(RuntimeError):
    """A router did not start; the message holds the tail of its log."""


class RouterProcess:
    """`async with RouterProcess(spec, fleet) as r:` → `r.url`; `r.usage` after exit."""

    def __init__(
        self,
        spec: RouterSpec,
        fleet: FleetView,
        *,
        startup_timeout_s: float = 60.0,
        sample_s: float = 0.1,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.spec = spec
        self.cpus = cpus
        self.fleet = fleet
        self.startup_timeout_s = startup_timeout_s
        self.sample_s = sample_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.usage = Usage()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"compare-{spec.name}-"))
        self.log_path = self._workdir / "router.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._sampler: asyncio.Task[None] | None = None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def __aenter__(self) -> RouterProcess:
        cmd = self.spec.command(self.fleet, self.port, self._workdir)
        env = dict(os.environ, **self.spec.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self._workdir, start_new_session=True,
            )  # fmt: skip
        if self.cpus:
            pin_tree(self._proc.pid, self.cpus)
        try:
            await self._wait_ready()
        except BaseException:
            await self._stop()
            raise
        if self.cpus:
            pin_tree(self._proc.pid, self.cpus)
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        async with httpx.AsyncClient(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RouterError(
                        f"{self.spec.name} exited with {self._proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(self.url + self.spec.ready_path)
                    if r.status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RouterError(f"{self.spec.name} not ready in {self.startup_timeout_s:g}s:\n"
                          f"{self.log_tail()}")  # fmt: skip

    async def _sample(self) -> None:
        assert self._proc is not None
        while True:
            rss = tree_rss_bytes(self._proc.pid)
            self.usage.peak_rss_bytes = max(self.usage.peak_rss_bytes, rss)
            await asyncio.sleep(self.sample_s)

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.usage.cpu_s = tree_cpu_seconds(self._proc.pid)
            self.usage.peak_rss_bytes = max(
                self.usage.peak_rss_bytes, tree_rss_bytes(self._proc.pid)
            )
            self.usage.cpus = tree_affinity(self._proc.pid)
        await self._stop()

    async def _stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # The router leads its own session: signal the group so helpers go too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)


#: kvroute proxy timeouts in the comparison: the peers' (`--request-timeout-secs` 1800), so
#: no router cuts a slow request before another would (kvroute's own first-byte default, 60 s,
#: turned an overloaded fleet's slow prefills into 504s and the pods into ejected ones).
PROXY_TIMEOUTS = {"first_byte_timeout_s": 1800.0, "total_timeout_s": 1800.0}


def kvroute_config(doc: dict[str, Any]) -> str:
    """`doc` (pods, blocks, ...) plus kvroute's default profile and a `round-robin` profile."""
    plugins = yaml.safe_load(DEFAULT_PLUGINS_YAML)
    plugins["plugins"].append({"type": "round-robin-picker"})
    plugins["schedulingProfiles"].append(
        {"name": "round-robin", "plugins": [{"pluginRef": "round-robin-picker"}]}
    )
    text = yaml.safe_dump({**doc, **plugins, "proxy": PROXY_TIMEOUTS, "seed": 1}, sort_keys=False)
    parse_config(text, "<compare kvroute config>")  # a bad config fails here, with its message
    return text
