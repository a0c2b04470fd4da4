"""vLLM's OpenAI response shapes: completion and chat bodies, SSE chunks, usage, errors.

Shapes follow vLLM's `CompletionResponse` / `ChatCompletionResponse` and their stream
variants: stream choices carry `logprobs`, `finish_reason` and `stop_reason` (null until the
last chunk of a choice); a chat stream starts with one `{"role": "assistant", "content": ""}`
delta per choice; with `stream_options.include_usage` the last chunk before `data: [DONE]` has
`"choices": []` and the usage (and `continuous_usage_stats` adds running usage to every chunk).
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.request import RequestError

_encode = msgspec.json.Encoder().encode

DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def stream_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    stop_reason: str | int | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    stop_reason: str | int | None = None,
    final: bool = False,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if final:
        choice["stop_reason"] = stop_reason
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    rid: str, created: int, model: str, chat: bool, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": stream_usage(prompt_tokens, completion_tokens),
    }


def completion_body(
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    use: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c["index"],
                "text": c["text"],
                "logprobs": None,
                "finish_reason": c["finish_reason"],
                "stop_reason": c["stop_reason"],
                "prompt_logprobs": None,
            }
            for c in choices
        ],
        "usage": use,
        "system_fingerprint": None,
        "kv_transfer_params": kv_transfer_params,
    }


def chat_body(
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    use: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c["index"],
                "message": {
                    "role": "assistant",
                    "content": c["text"],
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": c["finish_reason"],
                "stop_reason": c["stop_reason"],
            }
            for c in choices
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": use,
        "prompt_logprobs": None,
        "kv_transfer_params": kv_transfer_params,
    }


def error_body(err: RequestError) -> bytes:
    return _encode(err.to_json())


def encode(obj: Any) -> bytes:
    return _encode(obj)
