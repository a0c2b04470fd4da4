"""The one logging set-up of every command (proxy, serve, sidecar, emulate).

At the default level (info) the router logs one line per state change (a pod turns unhealthy
or healthy again, is ejected, its KV-event feed gaps or its index rebuilds, the config
reloads) and nothing per request or per metrics scrape: the HTTP client and server libraries'
own per-request INFO lines (httpx, aiohttp's and uvicorn's access loggers) are held to
warnings. The per-request line is the router's own access log (`logging.access_log`,
`kvroute.access`), off by default.

`format: json` writes one JSON object per line: `ts`, `level`, `logger`, `msg`, then any
extra fields the call passed (`log.info(..., extra={"pod": ...})`).

`setup_logging` may be called again (a config reload changes the level or the format): it
replaces the handler it installed, never stacks a second one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from router.ops_settings import LOG_FORMATS, LoggingSettings

#: Libraries that log one INFO line per HTTP request (each metrics scrape is one).
CHATTY_LOGGERS = ("httpx", "httpcore", "aiohttp.access", "aiohttp.client", "uvicorn.access")
ACCESS_LOGGER = "kvroute.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every `LogRecord` has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (RFC 3339, UTC), level, logger, msg, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _rfc3339(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class _Handler(logging.StreamHandler):
    """The handler `setup_logging` owns (recognised, and replaced, on a second call)."""


class _Tagged(logging.Filter):
    """Adds the process's tag to each record (a `process_tag` field in JSON lines)."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_tag = self.tag
        return True


#: The tag of this process's lines (`setup_logging(tag=...)`), None = untagged.
_tag: str | None = None


def setup_logging(
    level: str | int = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    tag: str | None = None,
) -> logging.Handler:
    """Route every log record of the process to `stream` (stderr) at `level`, in `fmt`.

    `tag`: which process of several wrote the line (`kvroute proxy --workers N`: each worker
    routes on its own state and logs its own state changes, so a pod going down is one line
    per worker; the tag tells them apart). Kept for later calls that give none."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if isinstance(level, str):
        number = logging.getLevelNamesMapping().get(level.upper())
        if number is None:
            raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)")
        level = number
    global _tag
    _tag = tag if tag is not None else _tag
    root = logging.getLogger()
    handler = _Handler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        text = (
            TEXT_FORMAT if _tag is None else TEXT_FORMAT.replace("%(name)s", f"[{_tag}] %(name)s")
        )
        handler.setFormatter(logging.Formatter(text))
    if _tag is not None:
        handler.addFilter(_Tagged(_tag))
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)  # its stream is not ours to close
    root.addHandler(handler)
    root.setLevel(level)
    quiet = max(level, logging.WARNING)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    # The access log is on or off by its setting, not by the level (it logs at INFO).
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    return handler


def apply_logging(
    settings: LoggingSettings, level_override: str | None = None, tag: str | None = None
) -> None:
    """`setup_logging` from a config's `logging:` section (a command-line level wins)."""
    setup_logging(level_override or settings.level, settings.format, tag=tag)
