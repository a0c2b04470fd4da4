"""The pod's HTTP faces: vLLM's OpenAI API app and the side-channel app (KV pulls, admin).

API app: `POST /v1/completions`, `POST /v1/chat/completions` (SSE or JSON), `GET /v1/models`,
`GET /health`, `GET /ping`, `POST /tokenize`, `POST /detokenize`, `GET /metrics`, `GET /version`,
`POST /reset_prefix_cache`,
`POST /v1/completions/render` and `/v1/chat/completions/render` (token ids per prompt),
and the emulator's own `GET /admin/timings`. Bodies are parsed by the router's
`parse_request`; errors are answered in vLLM's shape and wording (`errors`).

Side-channel app: `POST /kv/pull`, `POST /kv/release` (see `kv_transfer`), `GET /health`.

Admin app, only when the pod is started with `--admin-port` and only on that port (never the
API port a router forwards clients to): `GET|POST /admin/faults`, `GET /health`. It stays
reachable while the API port refuses connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import xxhash
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from router.emulator import errors, wire
from router.emulator.faults import FaultUpdateError
from router.emulator.runtime import PodRuntime, Prepared
from router.request import RequestError, parse_request

log = logging.getLogger(__name__)

#: The vLLM release whose wire formats the emulator follows (tests/real_vllm checks them).
VLLM_VERSION = "0.32.0+kvroute.emulator"


class StreamBroken(RuntimeError):
    """Raised inside a stream to break the connection mid-body (a crash fault, or a failed
    generation): the client sees the response end without its last chunk."""


def _json(obj: Any, status: int = 200) -> Response:
    return Response(wire.encode(obj), status_code=status, media_type="application/json")


def _error(err: RequestError, *, validation: bool = False) -> Response:
    """`validation`: the body failed parsing (vLLM's pydantic layer words those differently)."""
    err = errors.as_vllm(err, validation=validation)
    return Response(wire.error_body(err), status_code=err.status, media_type="application/json")


def build_api_app(rt: PodRuntime, refuse: Callable[[float], Awaitable[None]]) -> FastAPI:
    app = FastAPI(title="kvroute vLLM emulator", docs_url=None, redoc_url=None, openapi_url=None)
    #: W3C trace context of the last inference requests (`GET /admin/traceparents`): what a
    #: router propagated to the pod.
    traceparents: deque[str | None] = deque(maxlen=256)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        traceparents.append(request.headers.get("traceparent"))
        return await _generate(rt, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        traceparents.append(request.headers.get("traceparent"))
        return await _generate(rt, request, "/v1/chat/completions")

    @app.get("/admin/traceparents")
    async def seen_traceparents() -> Response:
        return _json(list(traceparents))

    @app.get("/v1/models")
    async def models() -> Response:
        created = int(time.time())
        # vLLM's root is the model path it loaded; the emulator's is the profile's model.
        data = [
            _model_card(rt.model, None, created, rt.settings.max_model_len, rt.profile.model.name),
            *(_model_card(a, rt.model, created, None, a) for a in sorted(rt.adapters)),
        ]
        return _json({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if rt.faults.settings.unhealthy else 200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        # SageMaker's health route in vLLM: the same answer as /health.
        return Response(status_code=503 if rt.faults.settings.unhealthy else 200)

    @app.get("/version")
    async def version() -> Response:
        return _json({"version": VLLM_VERSION})

    @app.get("/metrics")
    async def metrics() -> Response:
        if rt.faults.settings.metrics_error:
            rt.metrics.faults.labels("metrics_error").inc()
            return Response("metrics exporter failed\n", status_code=500)
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return _tokenize(rt, await request.body())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return _detokenize(rt, await request.body())

    @app.post("/v1/completions/render")
    async def render_completions(request: Request) -> Response:
        return await _render(rt, request, "/v1/completions")

    @app.post("/v1/chat/completions/render")
    async def render_chat(request: Request) -> Response:
        return await _render(rt, request, "/v1/chat/completions")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        if not rt.driver.reset_prefix_cache():
            return _error(RequestError(409, "prefix cache reset refused: blocks are in use"))
        return Response(status_code=200)

    @app.get("/admin/timings")
    async def timings() -> Response:
        return _json([dataclasses.asdict(t) for t in rt.driver.timings])

    return app


def build_side_app(rt: PodRuntime, refuse: Callable[[float], Awaitable[None]]) -> FastAPI:
    app = FastAPI(title="kvroute emulator side channel", docs_url=None, openapi_url=None)

    @app.post("/kv/pull")
    async def kv_pull(request: Request) -> Response:
        body = _object(await request.body())
        rid = body.get("remote_request_id") if body else None
        if not isinstance(rid, str):
            return _json({"error": "remote_request_id (string) is required"}, 400)
        engine_id = body.get("remote_engine_id")
        if engine_id is not None and engine_id != rt.engine_uuid:
            return _json({"error": f"engine {engine_id} is not this pod ({rt.engine_uuid})"}, 404)
        block_ids = body.get("remote_block_ids")
        status, answer = rt.pins.pull(rid, block_ids if isinstance(block_ids, list) else None)
        return _json(answer, status)

    @app.post("/kv/release")
    async def kv_release(request: Request) -> Response:
        body = _object(await request.body())
        rid = body.get("remote_request_id") if body else None
        if not isinstance(rid, str):
            return _json({"error": "remote_request_id (string) is required"}, 400)
        return _json({"released": rt.pins.release(rid)})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    return app


def build_admin_app(rt: PodRuntime, refuse: Callable[[float], Awaitable[None]]) -> FastAPI:
    """The fault-injection surface, served on its own port (`--admin-port`) only."""
    app = FastAPI(title="kvroute emulator admin", docs_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/admin/faults")
    async def get_faults() -> Response:
        return _json(dataclasses.asdict(rt.faults.settings))

    @app.post("/admin/faults")
    async def set_faults(request: Request) -> Response:
        body = _object(await request.body())
        if body is None:
            return _error(RequestError(400, "body must be a JSON object of fault fields"))
        try:
            settings, actions = rt.faults.update(body)
            await _run_actions(rt, actions, refuse)
        except FaultUpdateError as exc:
            return _error(RequestError(400, str(exc), "invalid_fault"))
        return _json(dataclasses.asdict(settings))

    return app


async def _run_actions(
    rt: PodRuntime, actions: dict[str, Any], refuse: Callable[[float], Awaitable[None]]
) -> None:
    pub = rt.publisher
    n = actions.get("drop_kv_events")
    if n is not None:
        if type(n) is not int or n < 0:
            raise FaultUpdateError("drop_kv_events must be an integer >= 0")
        if pub is None:
            raise FaultUpdateError("this pod publishes no KV events")
        pub.drop_next(n, from_replay=bool(actions.get("drop_kv_events_from_replay")))
        rt.metrics.faults.labels("drop_kv_events").inc(n)
    if actions.get("reset_kv_event_seq"):
        if pub is None:
            raise FaultUpdateError("this pod publishes no KV events")
        pub.restart()
        rt.metrics.faults.labels("reset_kv_event_seq").inc()
    if actions.get("reset_prefix_cache"):
        rt.driver.reset_prefix_cache()
    secs = actions.get("refuse_connections_s")
    if secs is not None:
        if isinstance(secs, bool) or not isinstance(secs, int | float) or secs < 0:
            raise FaultUpdateError("refuse_connections_s must be a number >= 0")
        rt.metrics.faults.labels("refuse_connections").inc()
        await refuse(float(secs))


def _object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = msgspec.json.decode(raw) if raw else {}
    except msgspec.DecodeError:
        return None
    return body if isinstance(body, dict) else None


def _model_card(
    name: str, parent: str | None, created: int, max_len: int | None, root: str
) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
        "permission": [
            {
                "id": f"modelperm-{xxhash.xxh3_64_hexdigest(name.encode())}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


def _tokenize(rt: PodRuntime, raw: bytes) -> Response:
    body = _object(raw)
    if body is None:
        return _error(
            RequestError(400, "body must be a JSON object", "invalid_json"), validation=True
        )
    body.setdefault("model", rt.model)
    chat = "messages" in body
    try:
        req = parse_request(
            body,
            "/v1/chat/completions" if chat else "/v1/completions",
            chat_template=rt.chat_template,
            adapters=rt.adapters,
        )
        ids = req.token_ids
        if ids is None:
            ids = rt.tokenizer.encode_prompt(req.prompt, req.segments, chat)
    except RequestError as err:
        return _error(err)
    return _json(
        {
            "count": len(ids),
            "max_model_len": rt.settings.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }
    )


def _detokenize(rt: PodRuntime, raw: bytes) -> Response:
    body = _object(raw)
    if body is None:
        return _error(
            RequestError(400, "body must be a JSON object", "invalid_json"), validation=True
        )
    model = body.get("model", rt.model)
    if model is not None and model != rt.model and model not in rt.adapters:
        return _error(errors.unknown_model(str(model), [rt.model]))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or any(type(t) is not int or t < 0 for t in tokens):
        err = RequestError(400, "'tokens' must be a list of token ids (integers >= 0)")
        return _error(err, validation=True)
    return _json({"prompt": "".join(rt.tokenizer.piece(t) for t in tokens)})


async def _render(rt: PodRuntime, request: Request, path: str) -> Response:
    """vLLM's render endpoints: the token ids (and sampling params) a request would run with,
    one entry per prompt; routers such as vllm-router key KV blocks on them."""
    try:
        req = parse_request(
            await request.body(),
            path,
            request.headers,
            chat_template=rt.chat_template,
            adapters=rt.adapters,
        )
        prep = rt.prepare(req)
    except RequestError as err:
        return _error(err)
    out = []
    seen: set[int] = set()
    for gen in prep.job.generations:
        ids = list(gen.sim.token_ids)
        if id(gen.sim.token_ids) in seen:
            continue
        seen.add(id(gen.sim.token_ids))
        out.append(
            {
                "request_id": req.request_id,
                "token_ids": ids,
                "sampling_params": {"max_tokens": gen.plan.num_tokens, "n": 1},
            }
        )
    return _json(out)


# ---------------------------------------------------------------------------- generation
async def _generate(rt: PodRuntime, request: Request, path: str) -> Response:
    raw = await request.body()
    try:
        req = parse_request(
            raw,
            path,
            request.headers,
            chat_template=rt.chat_template,
            adapters=rt.adapters,
            now=time.time(),
        )
    except RequestError as err:
        return _error(err, validation=True)
    try:
        prep = await rt.prepare_async(req)
    except RequestError as err:
        return _error(err)
    status = rt.faults.error_status()
    if status is not None:
        rt.metrics.faults.labels("error").inc()
        return _error(RequestError(status, f"injected fault: HTTP {status}", "injected_fault"))
    spike = rt.faults.spike_s()
    if spike:
        rt.metrics.faults.labels("latency_spike").inc()
        rt.delayed += 1
        try:
            await asyncio.sleep(spike)
        finally:
            rt.delayed -= 1
    await rt.attach_remote_prefill(prep)
    try:
        rt.driver.submit(prep.job)
    except ValueError as exc:
        return _error(RequestError(400, str(exc)))
    if req.stream:
        return StreamingResponse(_stream(rt, prep), media_type="text/event-stream; charset=utf-8")
    return await _complete(rt, prep)


async def _complete(rt: PodRuntime, prep: Prepared) -> Response:
    job = prep.job
    try:
        while not job.done:
            await job.changed.wait()
            job.changed.clear()
    except asyncio.CancelledError:
        rt.abandon(prep)
        raise
    failed = [g.failed for g in job.generations if g.failed]
    if failed:
        rt.abandon(prep)
        return _error(RequestError(500, f"generation failed: {failed[0]}", "engine_error"))
    ktp = rt.finish_job(prep)
    choices = []
    completion_tokens = 0
    for gen in job.generations:
        plan = gen.plan
        completion_tokens += plan.num_tokens
        choices.append(
            {
                "index": gen.index,
                "text": prep.echo_text[gen.index] + "".join(plan.pieces),
                "finish_reason": plan.finish_reason,
                "stop_reason": plan.stop_reason,
            }
        )
    rid = ("chatcmpl-" if prep.chat else "cmpl-") + prep.req.request_id
    use = wire.usage(sum(prep.prompt_tokens), completion_tokens, _cached_tokens(rt, prep))
    build = wire.chat_body if prep.chat else wire.completion_body
    return _json(build(rid, prep.created, prep.req.model, choices, use, ktp))


async def _stream(rt: PodRuntime, prep: Prepared) -> AsyncIterator[bytes]:
    job = prep.job
    gens = job.generations
    model = prep.req.model
    rid = ("chatcmpl-" if prep.chat else "cmpl-") + prep.req.request_id
    created = prep.created
    faults = rt.faults
    crash_after = faults.settings.crash_after_tokens
    stall = faults.stall_s()
    sent_total = 0
    completed = False
    prompt_total = sum(prep.prompt_tokens)
    # vLLM sends a chat stream's role chunks on the engine's first output (its first token),
    # not when the request is accepted: a router timing the first body byte sees the TTFT.
    roles_sent = not prep.chat
    try:
        while True:
            if not roles_sent and (job.done or any(g.ready > g.sent for g in gens)):
                roles_sent = True
                for gen in gens:
                    yield wire.sse(wire.chat_role_chunk(rid, created, model, gen.index))
            for gen in gens:
                if gen.failed:
                    raise StreamBroken(f"generation {gen.engine_id} failed: {gen.failed}")
                new = gen.ready - gen.sent
                if new <= 0:
                    continue
                if crash_after and sent_total + new >= crash_after:
                    new = crash_after - sent_total
                    if new > 0:
                        yield _token_chunk(prep, gen, rid, created, model, new, sent_total)
                    rt.metrics.faults.labels("crash").inc()
                    if faults.settings.crash_exits_process:
                        log.error("injected fault: exiting after %d tokens", crash_after)
                        os._exit(3)
                    raise StreamBroken(f"injected fault: stream broken after {crash_after} tokens")
                yield _token_chunk(prep, gen, rid, created, model, new, sent_total)
                sent_total += new
                if stall:
                    rt.metrics.faults.labels("stall").inc()
                    await asyncio.sleep(stall)
                    stall = 0.0
            if job.done and all(g.sent == g.plan.num_tokens for g in gens):
                break
            await job.changed.wait()
            job.changed.clear()
        rt.finish_job(prep)
        if prep.include_usage:
            cached = _cached_tokens(rt, prep)
            yield wire.sse(
                wire.usage_chunk(rid, created, model, prep.chat, prompt_total, sent_total, cached)
            )
        yield wire.DONE
        completed = True
    finally:
        if not completed:
            rt.abandon(prep)


def _cached_tokens(rt: PodRuntime, prep: Prepared) -> int | None:
    """vLLM's `num_cached_tokens` of the request, for its usage: the prompt tokens found
    computed when it was first scheduled (its local prefix-cache hit plus KV pulled from a
    prefill pod), once per prompt (its `n` choices share it). None unless the pod runs with
    `enable_prompt_tokens_details`."""
    if not rt.settings.enable_prompt_tokens_details:
        return None
    gens = prep.job.generations
    per_prompt = max(1, len(gens) // max(1, len(prep.prompt_tokens)))
    total = 0
    for gen in gens[::per_prompt]:
        fin = gen.finished
        if fin is not None:
            total += min(fin.prompt_tokens, fin.cached_tokens + fin.transferred_tokens)
    return total


def _token_chunk(
    prep: Prepared, gen: Any, rid: str, created: int, model: str, new: int, sent_total: int
) -> bytes:
    """The SSE events of a choice's next `new` tokens: one chunk per token, as vLLM sends
    (one engine step yields one token per request)."""
    plan = gen.plan
    out = []
    for _ in range(new):
        start = gen.sent
        gen.sent += 1
        sent_total += 1
        text = plan.pieces[start]
        last = gen.finished is not None and gen.sent == plan.num_tokens
        finish = plan.finish_reason if last else None
        stop_reason = plan.stop_reason if last else None
        if prep.chat:
            chunk = wire.chat_chunk(
                rid, created, model, gen.index, {"content": text}, finish, stop_reason, final=last
            )
        else:
            if start == 0 and prep.echo_text[gen.index]:
                text = prep.echo_text[gen.index] + text
            chunk = wire.completion_chunk(rid, created, model, gen.index, text, finish, stop_reason)
        if prep.continuous_usage:
            chunk["usage"] = wire.stream_usage(sum(prep.prompt_tokens), sent_total)
        out.append(wire.sse(chunk))
    return b"".join(out)
