"""vLLM's OpenAI response shapes: completion and chat bodies, SSE chunks, usage, errors.

Shapes, field names and key order follow vLLM 0.32 (checked field by field against a real
engine by `tests/real_vllm/test_emulator_parity.py`): stream choices carry `logprobs`,
`finish_reason` (null until the last chunk of a choice) and `token_ids`; a chat stream starts
with one `{"role": "assistant", "content": ""}` delta per choice (that chunk also carries the
top-level `prompt_token_ids` / `prompt_text`) and only its last chunk per choice has
`stop_reason`; with `stream_options.include_usage` the last chunk before `data: [DONE]` has
`"choices": []`, the usage and the `system_fingerprint` (and `continuous_usage_stats` adds
running usage to every chunk). `token_ids` / `prompt_token_ids` stay null: vLLM fills them
only when a request asks for them (`return_token_ids`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.emulator import errors
from router.request import RequestError

_encode = msgspec.json.Encoder().encode

DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


#: What vLLM puts in `system_fingerprint` ("vllm-<version>-<build>"); the emulator's build
#: part names it.
SYSTEM_FINGERPRINT = "vllm-0.32.0-kvroute"


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
) -> dict[str, Any]:
    """`cached_tokens`: the engine's `num_cached_tokens`, None without
    `enable_prompt_tokens_details` (vLLM sets the details only when it is on and the count is
    above 0; otherwise they stay null)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens} if cached_tokens else None,
        "completion_tokens_details": None,
    }


def stream_usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
) -> dict[str, Any]:
    """The usage of SSE chunks: vLLM serializes them without unset fields, so the details
    appear only when set (as `usage`'s)."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


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
                "prompt_token_ids": None,
                "token_ids": None,
            }
        ],
    }


def chat_role_chunk(rid: str, created: int, model: str, index: int) -> dict[str, Any]:
    """The first chunk of a chat stream, per choice."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "prompt_token_ids": None,
        "prompt_text": None,
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
    choice["token_ids"] = None
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    rid: str,
    created: int,
    model: str,
    chat: bool,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": stream_usage(prompt_tokens, completion_tokens, cached_tokens),
        "system_fingerprint": SYSTEM_FINGERPRINT,
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
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            for c in choices
        ],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": use,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
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
                    # vLLM 0.32's name (older releases: reasoning_content); null without a
                    # reasoning parser. An empty tool_calls list is left out, as vLLM does.
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": c["finish_reason"],
                "stop_reason": c["stop_reason"],
                "token_ids": None,
                "routed_experts": None,
            }
            for c in choices
        ],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": use,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


def error_body(err: RequestError) -> bytes:
    """vLLM's error shape (`errors.body`): message, type, param, integer code."""
    return _encode(errors.body(err))


def encode(obj: Any) -> bytes:
    return _encode(obj)
