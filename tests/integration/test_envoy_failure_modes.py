"""Envoy's failure modes with the shipped bootstraps: what a client sees when the picker dies,
drains or stalls. One Envoy per body mode for the whole module; each test runs its own
`kvroute serve` process (PickerProcess) on the port those Envoys point at, and kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from echo_pod import EchoPod
from envoy_stack import MODES, chat, pods_yaml, requires_envoy
from picker_process import SERVING, PickerProcess

from envoy_extproc.envoy_process import EnvoyProcess, free_port

pytestmark = [requires_envoy, pytest.mark.asyncio(loop_scope="module")]

NOT_SERVING = 2
#: "At once", not "after a timer": well under the bootstraps' timers that could end a
#: request otherwise (message_timeout 120 s, stream idle 300 s, route 600 s), with room for
#: a loaded 2-core CI machine (1.001 s seen there at load 9).
AT_ONCE_S = 3.0


@dataclass
class Fleet:
    pods: list[EchoPod]
    config: Path
    envoys: dict[str, EnvoyProcess]
    grpc_port: int
    health_port: int
    metrics_port: int

    def picker(self, lame_duck_s: float = 0.0, grace_s: float = 5.0) -> PickerProcess:
        return PickerProcess(
            self.config,
            self.grpc_port,
            self.health_port,
            self.metrics_port,
            lame_duck_s=lame_duck_s,
            grace_s=grace_s,
        )

    def client(self, mode: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.envoys[mode].url, timeout=20)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    pods = [EchoPod(chunk_interval_s=0.05) for _ in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for p in pods:
            await p.start()
            stack.push_async_callback(p.stop)
        config = tmp_path_factory.mktemp("failure-modes") / "router.yaml"
        config.write_text(pods_yaml(pods) + "seed: 7\n")
        grpc_port = free_port()
        envoys = {}
        for mode in MODES:
            envoys[mode] = await stack.enter_async_context(EnvoyProcess(mode, grpc_port))
        yield Fleet(pods, config, envoys, grpc_port, free_port(), free_port())


@pytest_asyncio.fixture(loop_scope="module")
async def slow_streams(fleet: Fleet) -> AsyncIterator[None]:
    """Pods stream 12 chunks 0.25 s apart (3 s) for the tests that kill things mid-stream."""
    for p in fleet.pods:
        p.chunks, p.chunk_interval_s = 12, 0.25
    yield
    for p in fleet.pods:
        p.chunks, p.chunk_interval_s = 4, 0.05


async def _post(client: httpx.AsyncClient, content: str) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=chat(content))
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("mode", MODES)
async def test_picker_killed_the_client_gets_503_json_at_once(fleet: Fleet, mode: str) -> None:
    async with fleet.picker() as picker, fleet.client(mode) as client:
        r, _ = await _post(client, "before the kill")
        assert r.status_code == 200
        await picker.kill()
        for i in range(3):
            r, elapsed = await _post(client, f"picker is gone {i}")
            assert r.status_code == 503
            assert elapsed < AT_ONCE_S
            assert r.headers["content-type"] == "application/json"
            error = r.json()["error"]
            assert error["code"] == "picker_unavailable"
            assert "endpoint picker is unavailable" in error["message"]


async def test_slow_upload_and_slow_stream_outlast_envoys_default_message_timeout(
    fleet: Fleet,
) -> None:
    """Envoy's default message_timeout is 200 ms. A body trickled in over ~1.2 s (the picker
    holds its routing answer until the body is whole) and a stream with 0.4 s between chunks
    must both complete under the shipped bootstraps; the picker's own errors keep their JSON
    body (the local-reply mapping for a dead picker must not rewrite them)."""
    body = json.dumps(chat("a long prompt " * 3000)).encode()
    step = len(body) // 6 + 1

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(0, len(body), step):
            yield body[i : i + step]
            await asyncio.sleep(0.2)

    pod_chunks = [(p.chunks, p.chunk_interval_s) for p in fleet.pods]
    for p in fleet.pods:
        p.chunks, p.chunk_interval_s = 4, 0.4
    try:
        async with fleet.picker():
            for mode in MODES:
                async with fleet.client(mode) as client:
                    t0 = time.perf_counter()
                    r = await client.post(
                        "/v1/chat/completions",
                        content=trickle(),
                        headers={"content-type": "application/json"},
                    )
                    assert r.status_code == 200, (mode, r.text)
                    assert r.json()["body_bytes"] == len(body)
                    assert time.perf_counter() - t0 > 1.0
                    r = await client.post("/v1/chat/completions", json=chat("s", stream=True))
                    assert r.status_code == 200, (mode, r.text)
                    assert r.text.endswith("data: [DONE]\n\n")
                    r = await client.post("/v1/chat/completions", json=chat("x") | {"model": "n"})
                    assert r.status_code == 404
                    assert r.json()["error"]["type"] == "not_found_error"
    finally:
        for p, (chunks, interval) in zip(fleet.pods, pod_chunks, strict=True):
            p.chunks, p.chunk_interval_s = chunks, interval


async def _open_stream(
    client: httpx.AsyncClient, stack: contextlib.AsyncExitStack, content: str
) -> AsyncIterator[bytes]:
    body = chat(content, stream=True)
    r = await stack.enter_async_context(client.stream("POST", "/v1/chat/completions", json=body))
    assert r.status_code == 200
    chunks = r.aiter_raw()
    first = await anext(chunks)
    assert b"served_by" in first
    return chunks


async def _until_streams_ended(metrics_port: int) -> None:
    """Wait until the picker has ended its ext_proc streams (it does so right after answering
    the response headers when the body is not sent to it), plus a moment for the gRPC status
    to reach Envoy: killed before that, the stream was still open and Envoy rightly turns its
    reset into an error for the client (seen once in CI)."""
    async with httpx.AsyncClient() as c:
        for _ in range(200):
            page = (await c.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            if "kvroute_extproc_streams_active 0.0" in page:
                await asyncio.sleep(0.05)
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the picker kept its ext_proc stream open")


async def _rest(chunks: AsyncIterator[bytes]) -> tuple[bytes, str | None]:
    """The rest of a stream and, when it broke, the error the client got."""
    text = b""
    try:
        async for c in chunks:
            text += c
    except httpx.HTTPError as e:
        return text, type(e).__name__
    return text, None


@pytest.mark.parametrize("mode", ["STREAMED", "BUFFERED"])
async def test_picker_killed_mid_stream_the_stream_survives_without_response_body_mode(
    fleet: Fleet, slow_streams: None, mode: str
) -> None:
    """response_body_mode NONE: after the response headers the picker is out of the path."""
    async with fleet.picker() as picker, fleet.client(mode) as client:
        async with contextlib.AsyncExitStack() as stack:
            chunks = await _open_stream(client, stack, "a long answer")
            await _until_streams_ended(fleet.metrics_port)
            await picker.kill()
            rest, error = await _rest(chunks)
        assert error is None
        assert rest.endswith(b"data: [DONE]\n\n")
        assert rest.count(b'"served_by"') >= 10


async def test_picker_killed_mid_stream_cuts_a_full_duplex_stream(
    fleet: Fleet, slow_streams: None
) -> None:
    """FULL_DUPLEX_STREAMED passes every response chunk through the picker (usage, TTFT): a
    picker death cuts the stream. This is what remains; the client is told, not left hanging."""
    async with fleet.picker() as picker, fleet.client("FULL_DUPLEX_STREAMED") as client:
        async with contextlib.AsyncExitStack() as stack:
            chunks = await _open_stream(client, stack, "a long answer")
            await picker.kill()
            t0 = time.perf_counter()
            rest, error = await _rest(chunks)
            elapsed = time.perf_counter() - t0
        assert not rest.endswith(b"data: [DONE]\n\n")
        assert error is not None
        assert elapsed < AT_ONCE_S


async def _picker_health_in_envoy(envoy: EnvoyProcess) -> set[str]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{envoy.admin_port}/clusters?format=json")
    for cluster in r.json()["cluster_statuses"]:
        if cluster["name"] == "kvroute_picker":
            (host,) = cluster["host_statuses"]
            return {k for k, v in host["health_status"].items() if v is True}
    raise AssertionError("no kvroute_picker cluster in Envoy")


async def test_sigterm_lame_duck_then_drain_the_open_stream_finishes(
    fleet: Fleet, slow_streams: None
) -> None:
    mode = "FULL_DUPLEX_STREAMED"  # the mode whose responses the drain must wait for
    envoy = fleet.envoys[mode]
    picker = fleet.picker(lame_duck_s=1.5, grace_s=10)
    async with picker, fleet.client(mode) as client:
        async with contextlib.AsyncExitStack() as stack:
            chunks = await _open_stream(client, stack, "a long answer across the shutdown")
            picker.signal(signal.SIGTERM)
            t_term = time.perf_counter()
            # (1) Lame duck: readiness flips at once, Envoy's health check sees it, and new
            # requests are still served.
            async with asyncio.timeout(1.0):
                while await picker.readiness() != NOT_SERVING:
                    await asyncio.sleep(0.02)
            r, _ = await _post(client, "during the lame duck")
            assert r.status_code == 200
            async with asyncio.timeout(3.0):
                while "failed_active_health_check" not in await _picker_health_in_envoy(envoy):
                    await asyncio.sleep(0.1)
            # (2) Drain: after the lame duck new requests get a clear 503 at once...
            await asyncio.sleep(max(0.0, 1.5 + 0.3 - (time.perf_counter() - t_term)))
            r, elapsed = await _post(client, "after the lame duck")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "picker_unavailable"
            assert elapsed < AT_ONCE_S
            # ...while the stream that was open at SIGTERM runs to its end.
            rest, error = await _rest(chunks)
        assert error is None
        assert rest.endswith(b"data: [DONE]\n\n")
        assert await picker.wait() == 0
        assert any("lame duck" in line for line in picker.log)


async def test_picker_restarted_serves_again_once_ready(fleet: Fleet) -> None:
    """After a kill, a new picker on the same port takes traffic again with no Envoy change."""
    async with fleet.picker() as first, fleet.client("BUFFERED") as client:
        await first.kill()
        r, _ = await _post(client, "down")
        assert r.status_code == 503
    async with fleet.picker() as second, fleet.client("BUFFERED") as client:
        assert await second.readiness() == SERVING
        r, _ = await _post(client, "up again")
        assert r.status_code == 200
