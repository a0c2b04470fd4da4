"""Fixtures: two real vLLM pods for all the tests here, and a kvroute proxy in front per test.

The pods start once (a start costs about 40 s on a quiet 2-core machine, minutes on a busy
one) and stop when the last test of this package has run, so they do not hold memory while
the rest of the suite runs: `vllm_fleet`. Tests use fresh random prompts, so what earlier
tests left in the engines' caches never meets a later test's prompt. `real_proxy` starts
`kvroute proxy`'s app on the fleet's config (the one `VllmFleet.router_config` writes) and
returns once the KV-event feed of every pod has delivered a batch (a ZMQ subscription takes a
moment to reach a connecting PUB, and batches sent before are lost).

Set `KVROUTE_VLLM_FLEET=FILE` to use pods a `python -m tests.real_vllm.vllm_pods --describe
FILE` process keeps up (no startup per run). A setup failure fails the tests; it never skips
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.config import parse_config
from router.proxy.app import ProxyApp, RunningServer
from router.proxy.settings import ProxySettings
from tests.real_vllm.vllm_pods import (
    MODEL_NAME,
    VllmFleet,
    VllmPod,
    VllmSetupError,
    adopt_fleet,
    make_fleet,
)

#: Generous: two pods share two cores with whatever else the machine runs.
READY_TIMEOUT_S = float(os.environ.get("KVROUTE_VLLM_READY_TIMEOUT_S", "600"))
#: No torch.compile warmup: it cost ~70 s of each start on a busy 2-core machine (eager:
#: ~3 s) and changes nothing the tests look at (prefix cache, events, metrics, errors).
VLLM_ARGS = ("--enforce-eager",)

#: The routing profile of the real-pod tests (and of benchmarks/real_vllm_multiturn.py):
#: the precise prefix index decides, queue length breaks ties.
PRECISE_PROFILE = """
plugins:
  - type: prefix-cache-scorer
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - {pluginRef: prefix-cache-scorer, weight: 2}
      - {pluginRef: queue-scorer, weight: 1}
      - {pluginRef: max-score-picker}
"""
PLUGINS = (
    PRECISE_PROFILE
    + """scrape: {interval_s: 0.2, timeout_s: 5.0, unhealthy_after: 3}
seed: 11
"""
)

#: The `events:` fields every test proxy gets (a replay from a busy engine may take a moment).
EVENTS: dict[str, Any] = {"replay_timeout_s": 10.0, "silent_after_s": 2.0}

SETTINGS = ProxySettings(
    health_interval_s=0.2,
    health_timeout_s=2.0,
    connect_timeout_s=2.0,
    first_byte_timeout_s=120.0,
    total_timeout_s=300.0,
)


_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def _report(line: str) -> None:
    """To the terminal past pytest's capture: startup times belong in the CI log even when
    every test passes."""
    capture = _config.pluginmanager.getplugin("capturemanager") if _config else None
    ctx = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with ctx:
        print(f"\n[real-vllm] {line}", file=sys.stderr, flush=True)


@pytest.fixture(scope="package")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmFleet]:
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    described = os.environ.get("KVROUTE_VLLM_FLEET")
    t0 = time.monotonic()
    try:
        if described:
            fleet = adopt_fleet(Path(described), log_dir)
        else:
            fleet = make_fleet(2, log_dir, extra_args=VLLM_ARGS)
            _report(f"venv and model ready in {time.monotonic() - t0:.0f} s")
            t1 = time.monotonic()
            fleet.start(READY_TIMEOUT_S)
            _report(
                f"2 pods healthy in {time.monotonic() - t1:.0f} s "
                f"(each: {[round(p.startup_s[-1]) for p in fleet.pods]} s); logs in {log_dir}"
            )
    except VllmSetupError as exc:
        pytest.fail(f"real vLLM pods could not be set up: {exc}", pytrace=False)
    try:
        yield fleet
    finally:
        fleet.stop()


def unique_text(words: int, seed: int | None = None) -> str:
    """Random words: a prompt no earlier request shares a block with."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(10**9)}" for _ in range(words))


async def wait_for(
    cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def engine_counter(pod: VllmPod, name: str) -> float:
    """Sum of a counter family on the engine's own /metrics (e.g. prefix_cache_hits)."""
    async with httpx.AsyncClient(timeout=10.0) as c:
        text = (await c.get(f"{pod.url}/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"vllm:{name}_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def join_feeds(app: Any, fleet: VllmFleet, timeout_s: float = 60.0) -> None:
    """Send small fresh prompts straight to each pod until the face's subscriber has heard
    a batch from it (subscriptions reach a connecting PUB asynchronously), then wait for the
    silence rule's baselines. `app`: anything with `.feeds` (the proxy, the ext_proc picker)."""
    sub = app.feeds.subscriber
    assert sub is not None, "KV events are not on in the proxy"
    async with httpx.AsyncClient(timeout=60.0) as c:
        for pod in fleet.pods:
            state = sub.feed_state(pod.endpoint)
            before = state.batches
            deadline = time.monotonic() + timeout_s
            while state.batches == before:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no KV-event batch from {pod.endpoint} reached kvroute")
                body = {"model": MODEL_NAME, "prompt": unique_text(40), "max_tokens": 1}
                r = await c.post(f"{pod.url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                for _ in range(20):  # up to 1 s for this prompt's batch
                    if state.batches > before:
                        break
                    await asyncio.sleep(0.05)
    await sub.ingester.drain()
    # The silence rule counts the engines' work from a settled baseline (see router.feeds):
    # wait for it, so work a test makes from here on is judged against it.
    for pod in fleet.pods:
        await wait_for(
            lambda ep=pod.endpoint: app.feeds.silence_baseline_ready(ep),
            timeout_s,
            f"the silence baseline of {pod.endpoint}",
        )


@contextlib.asynccontextmanager
async def running_real_proxy(
    fleet: VllmFleet,
    extra_yaml: str = "",
    events: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[ProxyApp, httpx.AsyncClient]]:
    text = fleet.router_config(PLUGINS + extra_yaml, {**EVENTS, **(events or {})})
    config = parse_config(text, "<real-vllm>")
    app = ProxyApp(config, dataclasses.replace(SETTINGS, **overrides))
    async with (
        RunningServer(app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=300.0) as client,
    ):
        await join_feeds(app, fleet)
        yield app, client


@pytest.fixture
def real_proxy(
    vllm_fleet: VllmFleet,
) -> Callable[..., contextlib.AbstractAsyncContextManager[tuple[ProxyApp, httpx.AsyncClient]]]:
    """`async with real_proxy(extra_yaml="", events=None, **settings) as (app, client)`."""

    def make(
        extra_yaml: str = "", events: dict[str, Any] | None = None, **overrides: Any
    ) -> contextlib.AbstractAsyncContextManager[tuple[ProxyApp, httpx.AsyncClient]]:
        return running_real_proxy(vllm_fleet, extra_yaml, events, **overrides)

    return make


def decision(resp: httpx.Response) -> dict[str, Any]:
    """The proxy's `x-kvroute-decision` header (requests must send `x-kvroute-debug: 1`)."""
    return json.loads(resp.headers["x-kvroute-decision"])


def replay_raw(pod: VllmPod, start: int = 0, timeout_s: float = 10.0) -> list[list[bytes]]:
    """Every frame list the pod's real replay socket answers for [start, ...], end marker
    included (as a DEALER receives them: empty delimiter first)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    out: list[list[bytes]] = []
    try:
        sock.connect(pod.replay_endpoint)
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            if not sock.poll(int(timeout_s * 1000)):
                raise AssertionError(f"replay socket of {pod.endpoint} did not answer")
            frames = sock.recv_multipart()
            out.append(frames)
            if frames[-2] == (-1).to_bytes(8, "big", signed=True):
                return out
    finally:
        sock.close(0)
        ctx.term()
