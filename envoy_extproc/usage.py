"""Reading token usage out of an OpenAI response body as it streams past.

Owns the incremental parse of a response: for SSE (`text/event-stream`) it scans each complete
`data:` line that mentions `"usage"` (vLLM puts usage in the last chunk before `[DONE]` with
`stream_options.include_usage`, or in every chunk with continuous usage stats; the last one
wins); for JSON it keeps the body up to a cap and decodes it at the end. Nothing here waits:
chunks are looked at and handed on by the caller unchanged.
"""

from __future__ import annotations

from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode
_USAGE = b'"usage"'


class UsageReader:
    """Feed response chunks; `usage` holds the last usage object seen (or None)."""

    __slots__ = ("_buf", "_json_cap", "_sse", "_tail", "usage")

    def __init__(self, content_type: str, json_cap_bytes: int = 1 << 20) -> None:
        self._sse = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
        self._json_cap = json_cap_bytes
        self._buf = bytearray()
        self._tail = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes, end: bool) -> None:
        if self._sse:
            self._feed_sse(chunk, end)
        else:
            if len(self._buf) + len(chunk) <= self._json_cap:
                self._buf += chunk
            else:
                self._json_cap = -1  # too large to keep: give up on this body
                self._buf.clear()
            if end and self._json_cap >= 0 and self._buf:
                self._take(bytes(self._buf))
                self._buf.clear()

    def _feed_sse(self, chunk: bytes, end: bool) -> None:
        data = self._tail + chunk if self._tail else chunk
        if _USAGE not in data and not end:
            # Only the incomplete last line can matter later.
            cut = data.rfind(b"\n")
            self._tail = data[cut + 1 :] if cut >= 0 else data
            return
        lines = data.split(b"\n")
        self._tail = b"" if end else lines.pop()
        for line in lines:
            if _USAGE in line and line.startswith(b"data:"):
                self._take(line[5:].strip())

    def _take(self, payload: bytes) -> None:
        try:
            doc = _decode(payload)
        except msgspec.DecodeError:
            return
        usage = doc.get("usage") if isinstance(doc, dict) else None
        if isinstance(usage, dict):
            self.usage = usage
