"""vLLM's NixlConnector two-phase flow (prefill on one pod, decode on another).

Shared by the proxy (when a decision has a prefill pod) and the decode sidecar (when a request
carries `x-prefiller-host-port`). See shared/specs/vllm-interfaces.md, "P/D with NixlConnector".

1. Prefill leg: the client's body with `kv_transfer_params.do_remote_decode = true`,
   `stream = false`, `max_tokens = 1` (and `max_completion_tokens = 1` if present), no
   `stream_options`, `min_tokens` or `min_completion_tokens`. The pod answers with top-level
   `kv_transfer_params` saying where the KV blocks wait.
2. Decode leg: the original body plus those `kv_transfer_params`.

A failed prefill leg is not an error for the client: the decode pod then prefills locally.
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.proxy.errors import UpstreamFailure
from router.proxy.upstream import Opened, Upstream

_encode = msgspec.json.encode

_PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_DROPPED_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")


class _PrefillAnswer(msgspec.Struct):
    kv_transfer_params: dict[str, Any] | None = None


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in _DROPPED_FOR_PREFILL}
    out["kv_transfer_params"] = dict(_PREFILL_PARAMS)
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> bytes:
    if kv_transfer_params is None:
        return _encode(body)
    return _encode({**body, "kv_transfer_params": kv_transfer_params})


class PrefillFailed(Exception):
    def __init__(self, reason: str, failure: UpstreamFailure | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure


async def run_prefill(
    upstream: Upstream,
    endpoint: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout_s: float,
) -> dict[str, Any]:
    """Run the prefill leg on `endpoint`; return the `kv_transfer_params` for the decode leg.
    Raises `PrefillFailed` (with the pod failure, if the pod failed) otherwise."""
    opened = await _open(upstream, endpoint, path, body, headers, timeout_s)
    resp = opened.response
    try:
        raw = await resp.read()
    except Exception as e:
        resp.close()
        raise PrefillFailed(f"prefill answer broken: {e!r}") from None
    if resp.status != 200:
        raise PrefillFailed(f"prefill pod answered HTTP {resp.status}")
    try:
        params = msgspec.json.decode(raw, type=_PrefillAnswer).kv_transfer_params
    except msgspec.DecodeError as e:
        raise PrefillFailed(f"prefill answer is not JSON: {e}") from None
    if not params:
        raise PrefillFailed("prefill answer has no kv_transfer_params")
    return params


async def _open(
    upstream: Upstream,
    endpoint: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout_s: float,
) -> Opened:
    try:
        return await upstream.open(
            endpoint,
            path,
            _encode(prefill_body(body)),
            headers,
            stream=False,
            first_byte_timeout_s=timeout_s,
        )
    except UpstreamFailure as f:
        raise PrefillFailed(f"prefill leg failed: {f}", f) from None
