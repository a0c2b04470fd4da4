"""Error answers of the proxy and sidecar, in OpenAI's `{"error": {message, type, code}}` shape.

`RequestError` (router/request.py) is the one error type; this module only turns it into bytes:
a JSON body for a plain answer, or a terminating SSE event once a stream has begun.
"""

from __future__ import annotations

import msgspec

from router.request import RequestError

_encode = msgspec.json.encode


class UpstreamFailure(Exception):
    """A pod failed the exchange. `retryable` when nothing reached the client and the pod
    never started the request (connect refused/reset, 5xx before the first byte)."""

    def __init__(self, endpoint: str, kind: str, detail: str, retryable: bool) -> None:
        super().__init__(f"{endpoint}: {kind}: {detail}")
        self.endpoint = endpoint
        #: connect | reset | status_5xx | timeout_first_byte | timeout_total | broken_stream
        self.kind = kind
        self.detail = detail
        self.retryable = retryable

    def to_request_error(self) -> RequestError:
        if self.kind.startswith("timeout"):
            what = "first byte" if self.kind == "timeout_first_byte" else "the response"
            return RequestError(504, f"pod {self.endpoint} timed out waiting for {what}", "timeout")
        return RequestError(502, f"pod {self.endpoint} failed: {self.detail}", "upstream_error")


def error_body(err: RequestError) -> bytes:
    return _encode(err.to_json())


def sse_error_event(err: RequestError) -> bytes:
    """The event that ends a stream that already sent chunks (vLLM ends its own the same way)."""
    return b"data: " + _encode(err.to_json()) + b"\n\ndata: [DONE]\n\n"


def error_headers(err: RequestError, retry_after_s: int) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if err.status == 429:
        headers.append((b"retry-after", str(max(1, retry_after_s)).encode()))
    return headers
