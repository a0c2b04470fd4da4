"""vLLM's error answers: wording, `type`, `param` and integer `code`, as vLLM 0.32 sends them.

vLLM answers `{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status.
Two kinds of 400 come out of it: a body that fails pydantic validation (bad JSON, a field of
the wrong type) has type `"Bad Request"` and `param` `"body.<field>"`; a check of the engine
layer (context length, `max_tokens`, a missing prompt) has type `"BadRequestError"` and the
bare parameter name, and its message ends with `(parameter=NAME, value=VALUE)`. Unknown
models are `NotFoundError` (404, param `model`).

`VllmError` is a `RequestError` that knows its vLLM type and param; `as_vllm` translates the
router's own `RequestError`s (from `parse_request`) into the same shape.
"""

from __future__ import annotations

import re
from typing import Any

from router.request import RequestError

_QUOTED_FIELD = re.compile(r"^'([A-Za-z_][\w.]*)'")


class VllmError(RequestError):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        value: Any = None,
        vllm_type: str | None = None,
    ) -> None:
        if param is not None and "(parameter=" not in message:
            message = (
                f"{message} (parameter={param})"
                if value is None
                else f"{message} (parameter={param}, value={value})"
            )
        super().__init__(status, message)
        self.param = param
        self.vllm_type = vllm_type or _type_of(status)


def _type_of(status: int) -> str:
    if status == 404:
        return "NotFoundError"
    if status == 400:
        return "BadRequestError"
    if status == 429:
        return "RateLimitError"
    if status >= 500:
        return "InternalServerError"
    return "BadRequestError"


def unknown_model(model: str, served: list[str]) -> VllmError:
    err = VllmError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.")
    err.param = "model"
    return err


def prompt_too_long(max_model_len: int, prompt_tokens: int, text_prompt: bool) -> VllmError:
    """vLLM tokenizes a text prompt truncated at max_model_len + 1 tokens, hence "at least"."""
    count = min(prompt_tokens, max_model_len + 1) if text_prompt else prompt_tokens
    qualifier = "at least " if count == max_model_len + 1 else ""
    return VllmError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
        f"contains {qualifier}{count} input tokens, which exceeds this limit even without any "
        "output tokens. Please reduce the length of the input prompt.",
        param="input_tokens",
        value=count,
    )


def max_tokens_too_small(value: int) -> VllmError:
    return VllmError(
        400, f"max_tokens must be at least 1, got {value}.", param="max_tokens", value=value
    )


def as_vllm(err: RequestError, *, validation: bool) -> VllmError:
    """The router's `RequestError` as vLLM would word it. `validation`: it came from parsing
    the body (vLLM's pydantic layer: type "Bad Request", param "body.<field>")."""
    if isinstance(err, VllmError):
        return err
    if err.code == "missing_field" and err.message.startswith("'prompt'"):
        return VllmError(
            400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
        )
    m = _QUOTED_FIELD.match(err.message)
    field = m.group(1) if m else None
    if validation and err.status == 400:
        out = VllmError(400, err.message, vllm_type="Bad Request")
        out.param = f"body.{field}" if field else "body"
        return out
    out = VllmError(err.status, err.message)
    out.param = field
    return out


def body(err: RequestError) -> dict[str, Any]:
    e = err if isinstance(err, VllmError) else as_vllm(err, validation=False)
    return {
        "error": {"message": e.message, "type": e.vllm_type, "param": e.param, "code": e.status}
    }
