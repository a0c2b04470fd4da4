"""Both faces export one metric set: every query of the shipped Grafana dashboards finds its
families on `kvroute proxy` and on `kvroute serve`, and the decomposed hit rate (prompt,
available, captured, delivered) moves live on each, on Prometheus and on `/debug/reuse`.

Each face routes a two-turn conversation to two emulated vLLM pods that publish KV events (so
the precise index knows what each pod caches): the proxy forwards itself; the picker is driven
as Envoy drives it (ext_proc, full duplex both ways), the test carrying each request to the
chosen pod and the pod's real answer back through the picker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.blocks import BUNDLED_TOKENIZER
from router.config import parse_config
from router.emulator.server import EmulatorPod
from router.emulator.settings import EmulatorSettings

GRAFANA = Path(__file__).resolve().parents[1] / "configs" / "grafana"
MODEL = "m"
FACES = ("proxy", "extproc")
#: One family per reuse figure (the interface contract's names and labels).
REUSE = {
    "kvroute_prompt_tokens_total": {"model", "pod"},
    "kvroute_prefix_tokens_available_total": {"model"},
    "kvroute_prefix_tokens_captured_total": {"model", "pod"},
    "kvroute_prefix_tokens_delivered_total": {"model", "pod"},
}


def dashboard_families() -> dict[str, set[str]]:
    """Dashboard file → the metric families its queries read (suffixes stripped)."""
    out: dict[str, set[str]] = {}
    for path in sorted(GRAFANA.glob("*.json")):
        dash = json.loads(path.read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        out[path.name] = {
            re.sub(r"_(bucket|sum|count|total)$", "", m)
            for e in exprs
            for m in re.findall(r"kvroute_\w+", e)
        }
    return out


def _conversation(turn: int) -> dict[str, Any]:
    """Turn 2 repeats turn 1's prompt and adds to it: a prefix the first pod caches."""
    text = " ".join(f"word{i % 97}" for i in range(400))
    messages = [{"role": "user", "content": text}]
    if turn == 2:
        messages += [
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": "and now the rest of it, please"},
        ]
    return {"model": MODEL, "messages": messages, "max_tokens": 4}


async def _until(check: Callable[[], Awaitable[bool]], what: str, tries: int = 200) -> None:
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached: {what}")


@contextlib.asynccontextmanager
async def _pods(details: bool, n: int = 2) -> AsyncIterator[list[EmulatorPod]]:
    async with contextlib.AsyncExitStack() as stack:
        pods = []
        for _ in range(n):
            settings = EmulatorSettings(
                port=0,
                speedup=50.0,
                num_gpu_blocks=4096,
                model=MODEL,
                tokenizer=BUNDLED_TOKENIZER,
                events_bind="tcp://127.0.0.1:0",
                enable_prompt_tokens_details=details,
            )
            pods.append(await stack.enter_async_context(EmulatorPod(settings)))
        yield pods


def _config(pods: list[EmulatorPod]) -> str:
    rows = "".join(
        f"  - {{endpoint: '{p.endpoint}', models: [{MODEL}], "
        f"kv_events_endpoint: '{p.kv_events_endpoint}'}}\n"
        for p in pods
    )
    return (
        f"pods:\n{rows}blocks: {{mode: tokens, tokenizer_path: '{BUNDLED_TOKENIZER}'}}\n"
        "scrape: {interval_s: 0.1}\n"
    )


class _Face:
    """One running face: send a request through it, read its metrics page and /debug/reuse."""

    send: Callable[[dict[str, Any]], Awaitable[None]]
    metrics_url: str
    reuse_url: str
    feeds: Any


@contextlib.asynccontextmanager
async def _proxy(config: str) -> AsyncIterator[_Face]:
    from router.proxy.app import ProxyApp, RunningServer
    from router.proxy.settings import ProxySettings

    app = ProxyApp(parse_config(config), ProxySettings(health_interval_s=0.1))
    async with RunningServer(app) as server, httpx.AsyncClient(timeout=30) as client:
        face = _Face()

        async def send(body: dict[str, Any]) -> None:
            r = await client.post(f"{server.url}/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text

        face.send = send
        face.metrics_url = f"{server.url}/metrics"
        face.reuse_url = f"{server.url}/debug/reuse"
        face.feeds = app.feeds
        yield face


@contextlib.asynccontextmanager
async def _picker(config: str) -> AsyncIterator[_Face]:
    import grpc
    from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from envoy_extproc.messages import DESTINATION_HEADER
    from envoy_extproc.server import PickerServer
    from envoy_extproc.settings import ExtProcSettings
    from tests.extproc.extproc_client import (
        body_msg,
        headers_msg,
        lb_metadata,
        post_headers,
        response_body_msg,
        response_headers_msg,
    )

    settings = ExtProcSettings(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0)
    full_duplex = ProcessingMode.FULL_DUPLEX_STREAMED
    async with (
        PickerServer(parse_config(config), settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as channel,
        httpx.AsyncClient(timeout=30) as client,
    ):
        face = _Face()

        async def send(body: dict[str, Any]) -> None:
            raw = json.dumps(body).encode()
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(
                headers_msg(post_headers(), mode=full_duplex, response_mode=full_duplex)
            )
            await call.write(body_msg(raw, True))
            first = await call.read()
            assert first.WhichOneof("response") == "request_headers", first
            await call.read()  # the request body, passed on
            pod = lb_metadata(first)[DESTINATION_HEADER]
            # Envoy's part: the request to the chosen pod, its answer back to the picker.
            answer = await client.post(f"http://{pod}/v1/chat/completions", content=raw)
            assert answer.status_code == 200, answer.text
            await call.write(response_headers_msg(200, "application/json"))
            await call.read()
            await call.write(response_body_msg(answer.content, True))
            await call.read()
            await call.done_writing()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.read()

        face.send = send
        face.metrics_url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
        face.reuse_url = f"http://127.0.0.1:{server.ports.metrics}/debug/reuse"
        face.feeds = server.feeds
        yield face


async def _samples(url: str) -> dict[str, list[Any]]:
    async with httpx.AsyncClient() as c:
        page = (await c.get(url)).text
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(page):
        out.setdefault(family.name, [])
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


async def _reuse(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        r = await c.get(url)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


@pytest.mark.parametrize("details", [False, True], ids=["vllm-default", "prompt-tokens-details"])
@pytest.mark.parametrize("face_name", FACES)
async def test_each_face_exports_the_dashboards_families_and_the_reuse_figures(
    face_name: str, details: bool
) -> None:
    """`details`: the pods run as vLLM with `--enable-prompt-tokens-details` (delivered from
    the responses' cached_tokens) or without (vLLM's default: from the scraped hits)."""
    run = _proxy if face_name == "proxy" else _picker
    async with _pods(details) as pods, run(_config(pods)) as face:
        index = face.feeds.precise_index
        assert index is not None
        await face.send(_conversation(1))

        async def stored() -> bool:  # the first pod's KV events reached the precise index
            return any(index.pod_block_count(p.endpoint) > 0 for p in pods)

        await _until(stored, "KV events of turn 1 in the precise index")
        await face.send(_conversation(2))

        async def delivered() -> bool:  # the engine's hit reached a scrape
            m = (await _reuse(face.reuse_url))["models"].get(MODEL)
            return bool(m) and m["delivered_tokens"] > 0

        await _until(delivered, "the engine's prefix-cache hits in the delivered figure")
        samples = await _samples(face.metrics_url)
        report = await _reuse(face.reuse_url)

    # Every query of every shipped dashboard reads families this face exports.
    for name, families in dashboard_families().items():
        missing = {f for f in families if f not in samples and f + "_total" not in samples}
        assert not missing, f"{name} on {face_name}: {sorted(missing)}"
    (open_requests,) = samples["kvroute_open_requests"]
    assert open_requests.labels == {"face": face_name}
    assert sum(s.value for s in samples["kvroute_requests_total"]) == 2

    # The four reuse families, with the contract's labels.
    for family, labels in REUSE.items():
        assert samples[family], family
        assert all(set(s.labels) == labels for s in samples[family]), family
    prompt = sum(s.value for s in samples["kvroute_prompt_tokens_total"])
    available = sum(s.value for s in samples["kvroute_prefix_tokens_available_total"])
    captured = sum(s.value for s in samples["kvroute_prefix_tokens_captured_total"])
    delivered_total = sum(s.value for s in samples["kvroute_prefix_tokens_delivered_total"])
    # Turn 2 repeats turn 1's prompt: reuse is available, routing took it to the pod holding
    # it, and that engine served it from its cache.
    assert prompt > available >= captured > 0
    assert delivered_total > 0

    # /debug/reuse: the same totals, and the rates and gaps derived from them.
    m = report["models"][MODEL]
    assert (m["prompt_tokens"], m["available_tokens"], m["captured_tokens"]) == (
        prompt,
        available,
        captured,
    )
    assert m["delivered_tokens"] == delivered_total
    assert m["rates"]["captured"] == round(captured / prompt, 6)
    assert m["gaps"]["routing_tokens"] == available - captured
    assert m["gaps"]["engine_tokens"] == captured - m["delivered_tokens"]
    assert set(m["pods"]) <= {p.endpoint for p in pods}
    # Without the details (vLLM's default) the scrapes count; with them, the pod whose answer
    # reported cached tokens is counted from its responses.
    (holder,) = [pod for pod, row in m["pods"].items() if row["captured_tokens"] > 0]
    assert m["pods"][holder]["delivered_source"] == ("responses" if details else "scrapes")
