"""Error answers of the proxy and sidecar, shaped like vLLM's own, and pod failures.

vLLM answers `{"error": {"message", "type", "param", "code"}}` with `type` an error class name
("BadRequestError", "NotFoundError"...) and `code` the HTTP status as an integer
(`ErrorResponse`/`ErrorInfo` in vllm/entrypoints/openai/protocol.py). The proxy relays vLLM's
errors, so its own take the same shape: a client parses one form whoever answered. Our short
machine-readable reason (`RequestError.code`, e.g. "invalid_json") goes in the
`x-kvroute-error` header instead.

`RequestError` (router/request.py) is the one error type; this module only turns it into bytes:
a JSON body for a plain answer, or a terminating SSE event once a stream has begun.
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.request import RequestError

_encode = msgspec.json.encode

#: vLLM-style error class per HTTP status (others: "BadRequestError" for 4xx,
#: "InternalServerError" for 5xx).
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

#: Statuses after which the client's connection is closed: its body may be unread.
_CLOSE_AFTER = frozenset({408, 413})


class UpstreamFailure(Exception):
    """A pod failed the exchange. `retryable` when nothing reached the client and the pod
    never started the request (connect refused/reset, 5xx before the first byte)."""

    def __init__(self, endpoint: str, kind: str, detail: str, retryable: bool) -> None:
        super().__init__(f"{endpoint}: {kind}: {detail}")
        self.endpoint = endpoint
        #: connect | reset | status_5xx | timeout_first_byte | timeout_total | timeout_idle
        #: | broken_stream
        self.kind = kind
        #: For logs: the client library's own words (never shown to a client).
        self.detail = detail
        self.retryable = retryable

    def user_message(self) -> str:
        """What happened, in the words of someone calling a model server."""
        ep = self.endpoint
        return {
            "connect": f"could not connect to the model server {ep}",
            "reset": f"the model server {ep} closed the connection before answering",
            "broken_stream": (
                f"the model server {ep} closed the connection before the response was complete"
            ),
            "timeout_first_byte": f"the model server {ep} did not start answering in time "
            f"({self.detail})",
            "timeout_idle": f"the model server {ep} stopped sending in the middle of the "
            f"response ({self.detail})",
            "timeout_total": f"the model server {ep} did not finish the response in time "
            f"({self.detail})",
            "status_5xx": f"the model server {ep} failed: {self.detail}",
        }.get(self.kind, f"the model server {ep} failed")

    def to_request_error(self) -> RequestError:
        status = 504 if self.kind.startswith("timeout") else 502
        code = "timeout" if status == 504 else "upstream_error"
        return RequestError(status, self.user_message(), code)


def error_json(err: RequestError) -> dict[str, Any]:
    """vLLM's error object for `err`."""
    kind = ERROR_TYPES.get(err.status) or (
        "InternalServerError" if err.status >= 500 else "BadRequestError"
    )
    return {
        "error": {
            "message": err.message,
            "type": kind,
            "param": getattr(err, "param", None),
            "code": err.status,
        }
    }


def error_body(err: RequestError) -> bytes:
    return _encode(error_json(err))


def sse_error_event(err: RequestError) -> bytes:
    """The event that ends a stream that already sent chunks (vLLM ends its own the same way)."""
    return b"data: " + error_body(err) + b"\n\ndata: [DONE]\n\n"


def error_headers(err: RequestError, retry_after_s: int) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"x-kvroute-error", err.code.encode())]
    if err.status in (429, 503):
        headers.append((b"retry-after", str(max(1, retry_after_s)).encode()))
    if err.status in _CLOSE_AFTER:
        headers.append((b"connection", b"close"))
    return headers
