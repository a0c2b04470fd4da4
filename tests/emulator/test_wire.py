"""Wire fidelity of one emulated pod: vLLM's JSON and SSE shapes, errors, models, metrics."""

from __future__ import annotations

import json

import httpx

from router.emulator.server import EmulatorPod
from router.request import RequestError, parse_request
from router.scrape import parse_vllm_metrics
from tests.emulator.conftest import MODEL, sse_data

CHOICE_KEYS = {
    "index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_logprobs",
    "prompt_token_ids", "routed_experts",
}  # fmt: skip
STREAM_CHOICE_KEYS = [
    "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids",
]  # fmt: skip


async def test_completion_body_has_vllm_fields_and_exact_usage(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": list(range(1, 41)), "max_tokens": 7}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["model"] == MODEL and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert set(choice) == CHOICE_KEYS
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert out["usage"]["prompt_tokens"] == 40
    assert out["usage"]["completion_tokens"] == 7
    assert out["usage"]["total_tokens"] == 47
    assert "kv_transfer_params" in out


async def test_same_prompt_and_seed_give_the_same_text(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12}
    a = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    b = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    c = (await client.post("/v1/completions", json={**body, "seed": 5})).json()
    assert a == b and a.strip()
    assert c["choices"][0]["text"] != a


async def test_completion_stream_chunks_end_with_usage_and_done(client: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "prompt": "Tell me a story",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(list(c["choices"][0]) == STREAM_CHOICE_KEYS for c in chunks)
    assert len(chunks) == 5  # one chunk per token, as vLLM
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    plain = (
        await client.post("/v1/completions", json={**body, "stream": False, "stream_options": None})
    ).json()
    assert streamed == plain["choices"][0]["text"]


async def test_chat_stream_starts_with_the_role_delta(client: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    events = sse_data((await client.post("/v1/chat/completions", json=body)).text)
    assert events[-1] == "[DONE]"
    first, *rest = events[:-1]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in rest[-1]  # no include_usage: no usage chunk


async def test_chat_stream_role_chunk_waits_for_the_first_token(start_pod) -> None:  # type: ignore[no-untyped-def]
    """vLLM sends the role delta on the engine's first output, so a router timing a stream's
    first body byte measures the time to first token (and learns prefill rates from it): by
    the time the first event is read, the pod has counted the request's first token."""
    pod: EmulatorPod = await start_pod(speedup=1.0)  # a 6,000-token prefill: ~0.15 s
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "alpha beta gamma " * 2000}],
        "max_tokens": 2,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=pod.url, timeout=30.0) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.aiter_lines()
        first = await anext(lines)
        assert json.loads(first[len("data: ") :])["choices"][0]["delta"]["role"] == "assistant"
        metrics = (await c.get("/metrics")).text
        ttft_count = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith("vllm:time_to_first_token_seconds_count")
        ]
        assert float(ttft_count[0].rsplit(" ", 1)[1]) == 1.0
        assert [ln async for ln in lines if ln][-1] == "data: [DONE]"


async def test_chat_completion_body_shape(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    out = (await client.post("/v1/chat/completions", json=body)).json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str) and msg["content"]
    assert out["usage"]["completion_tokens"] == 4


async def test_stop_string_cuts_the_text_and_says_why(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 40, "ignore_eos": True}
    full = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    stop = full.split()[3]
    out = (await client.post("/v1/completions", json={**body, "stop": [stop]})).json()
    choice = out["choices"][0]
    assert choice["text"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert out["usage"]["completion_tokens"] < 40


async def test_batch_prompts_and_n_give_indexed_choices(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": ["one two", "three four five"], "n": 2, "max_tokens": 3}
    out = (await client.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] == 12


async def test_echo_mode_repeats_the_prompt(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(output_mode="echo")
    async with httpx.AsyncClient(base_url=pod.url) as c:
        body = {"model": MODEL, "prompt": "Hello there, world!", "max_tokens": 100}
        out = (await c.post("/v1/completions", json=body)).json()
    text = out["choices"][0]["text"]
    assert text.startswith("Hello there, world!")


async def test_bad_bodies_get_vllms_error_shape_with_the_parsers_reason(
    client: httpx.AsyncClient,
) -> None:
    for raw, path, vllm_type, param in (
        (b"{not json", "/v1/completions", "Bad Request", "body"),
        (b'{"model": "m", "messages": 3}', "/v1/chat/completions", "Bad Request", "body.messages"),
    ):
        r = await client.post(path, content=raw)
        try:
            parse_request(raw, path)
        except RequestError as err:
            expected = err
        assert r.status_code == expected.status == 400
        assert r.json() == {
            "error": {"message": expected.message, "type": vllm_type, "param": param, "code": 400}
        }
    r = await client.post("/v1/completions", content=b'{"model": "m"}')
    assert r.json()["error"] == {
        "message": "Either prompt or prompt_embeds must be provided and non-empty. "
        "(parameter=prompt)",
        "type": "BadRequestError",
        "param": "prompt",
        "code": 400,
    }


async def test_unknown_model_is_404_and_context_overflow_400(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(max_model_len=1000)
    async with httpx.AsyncClient(base_url=pod.url, timeout=30.0) as client:
        await _unknown_model_and_overflow(client)


async def _unknown_model_and_overflow(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": f"The model `nope` does not exist. Valid aliases: {MODEL}.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    # vLLM 0.32 clamps max_tokens to the room left; only a prompt over the limit is refused.
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [1] * 100, "max_tokens": 5000}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1000 - 100
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 1005})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "This model's maximum context length is 1000 tokens. However, your prompt "
        "contains 1005 input tokens, which exceeds this limit even without any output "
        "tokens. Please reduce the length of the input prompt. (parameter=input_tokens, "
        "value=1005)",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    }


async def test_models_health_version_tokenize(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 131_072
    assert (await client.get("/health")).status_code == 200
    assert "version" in (await client.get("/version")).json()
    tok = (await client.post("/tokenize", json={"prompt": "hello world again"})).json()
    assert tok["count"] == len(tok["tokens"]) == 3 and tok["max_model_len"] == 131_072
    chat = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["count"] > 0


async def test_metrics_parse_with_the_routers_scraper(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 64, "max_tokens": 2})
    await client.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 64, "max_tokens": 2})
    text = (await client.get("/metrics")).text
    snap = parse_vllm_metrics(text, MODEL, now=1.0)
    assert snap.block_size == 16 and snap.running == 0 and snap.waiting == 0
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:cache_config_info",
        "vllm:num_requests_waiting_by_reason",
        "vllm:prompt_tokens_cached_total",
        "vllm:request_prefill_time_seconds_count",
    ):
        assert name + "{" in text, name
    assert 'model_name="meta-llama/Llama-3.1-8B-Instruct"' in text
    assert "vllm:gpu_cache_usage_perc" not in text
    hits = [ln for ln in text.splitlines() if ln.startswith("vllm:prefix_cache_hits_total")]
    assert float(hits[0].rsplit(" ", 1)[1]) == 48.0  # 3 full blocks of the repeated prompt


async def test_old_metric_names_by_flag(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(old_metric_names=True, lora_adapters=("sql",))
    async with httpx.AsyncClient(base_url=pod.url) as c:
        await c.post("/v1/completions", json={"model": "sql", "prompt": "x y", "max_tokens": 3})
        text = (await c.get("/metrics")).text
        models = (await c.get("/v1/models")).json()["data"]
    assert "vllm:gpu_cache_usage_perc{" in text
    assert "vllm:time_per_output_token_seconds_bucket{" in text
    assert "vllm:inter_token_latency_seconds_bucket{" in text
    assert [m["id"] for m in models] == [MODEL, "sql"] and models[1]["parent"] == MODEL
    assert parse_vllm_metrics(text, now=0.0).running == 0


async def test_chat_template_renders_the_prompt(start_pod, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    config = tmp_path / "tokenizer_config.json"
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    config.write_text(json.dumps({"chat_template": template}))
    pod: EmulatorPod = await start_pod(chat_template=str(config))
    async with httpx.AsyncClient(base_url=pod.url) as c:
        msgs = [{"role": "user", "content": "hello there"}]
        chat = (await c.post("/tokenize", json={"messages": msgs})).json()
        plain = await c.post("/tokenize", json={"prompt": "[user] hello there\n[assistant]"})
    assert chat["tokens"] == plain.json()["tokens"]


async def test_lora_adapter_requests_show_in_lora_info(start_pod) -> None:  # type: ignore[no-untyped-def]
    pod: EmulatorPod = await start_pod(lora_adapters=("sql-lora",), speedup=1.0)
    async with httpx.AsyncClient(base_url=pod.url) as c:
        body = {"model": "sql-lora", "prompt": [3] * 40, "max_tokens": 50, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                text = (await c.get("/metrics")).text
                break
    snap = parse_vllm_metrics(text, now=0.0)
    assert snap.running_adapters == frozenset({"sql-lora"})
