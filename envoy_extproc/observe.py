"""What `kvroute serve` adds around its picker when asked: tracing spans and the access log,
and its part of a config reload (`router.config_reload`).

Tracing (`router.tracing`): a request's span opens when the picker routes it (continuing the
client's `traceparent` from the request headers Envoy forwards) and closes when the stream
settles it (`Picker.complete` / `Picker.fail`); tokenize, schedule and the plugins are its
children, and an `upstream` span stands for Envoy's exchange with the pod: its context goes to
the pod as a `traceparent` header in the routing mutation (`PickerTracing.headers`). The
picker's `parse` is not a span of its own here (it is inside the request span's time).

Access log (`logging.access_log`): one `kvroute.access` line per settled request: kind
(completions or chat), outcome (`ok` or the status), model, pod, duration.

Reload: `EXTPROC_LIVE_FIELDS` apply live (the picker reads them per request, the server at
shutdown); ports, passive health and its outlier policy wait for a restart. The new picker is
built around the new scheduler and put in the servicer in one step; open streams keep the
picker (and so the scheduler) they started with.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from envoy_extproc.picker import Picker
from envoy_extproc.settings import ExtProcSettings
from router.config import RouterConfig
from router.config_reload import ConfigChange
from router.log_setup import ACCESS_LOGGER
from router.request import ChatTemplate, RequestError
from router.scheduler import Scheduler

if TYPE_CHECKING:
    from envoy_extproc.server import PickerServer
    from router.tracing import RequestTrace, RequestTracing

access_log = logging.getLogger(ACCESS_LOGGER)

EXTPROC_LIVE_FIELDS = frozenset(
    {
        "extproc.fallbacks_in_header",
        "extproc.parse_responses",
        "extproc.max_response_json_bytes",
        "extproc.lame_duck_s",
        "extproc.grace_period_s",
        "logging.access_log",
    }
)


class PickerTracing:
    """The picker's tracing: requests' spans from routing to settling (`picker.tracing`)."""

    def __init__(self, tracing: RequestTracing) -> None:
        self.tracing = tracing
        #: id(decision) → (request trace, traceparent for the pod), until settled.
        self._open: dict[int, tuple[RequestTrace, str]] = {}

    def headers(self, decision: Any, extra: dict[str, str] | None) -> dict[str, str]:
        """`extra` plus the `traceparent` the pod must receive (the routing mutation's)."""
        entry = self._open.get(id(decision))
        out = dict(extra or {})
        if entry is not None:
            out["traceparent"] = entry[1]
        return out

    def wrap(self, picker: Picker) -> None:
        tracing = self.tracing
        route, complete, fail = picker.route, picker.complete, picker.fail
        tracing.trace_tokenize(picker.tokenize)

        async def route_traced(body: bytes, path: str, headers: Any, subset: Any) -> Any:
            rt = tracing.start_request(f"POST {path}", headers, attach=False)
            with tracing.attached(rt):
                try:
                    decision = await route(body, path, headers, subset)
                except RequestError as e:
                    tracing.end_request(rt, e.status)
                    raise
                _span, traceparent = tracing.start_upstream(decision.target, rt)
            self._open[id(decision)] = (rt, traceparent)
            return decision

        def complete_traced(decision: Any, *args: Any, **kwargs: Any) -> None:
            try:
                complete(decision, *args, **kwargs)
            finally:
                entry = self._open.pop(id(decision), None)
                if entry is not None:
                    tracing.end_request(entry[0], 200)

        def fail_traced(
            decision: Any, endpoint: str, kind: str, status: int = 0, **kw: Any
        ) -> None:
            try:
                fail(decision, endpoint, kind, status, **kw)
            finally:
                entry = self._open.pop(id(decision), None)
                if entry is not None:
                    tracing.end_request(entry[0], status)

        picker.route = route_traced  # type: ignore[method-assign]
        picker.complete = complete_traced  # type: ignore[method-assign]
        picker.fail = fail_traced  # type: ignore[method-assign]
        picker.tracing = self  # type: ignore[attr-defined]


def log_access(picker: Picker) -> None:
    """One `kvroute.access` line per request the picker settles."""
    complete, fail = picker.complete, picker.fail

    def line(decision: Any, status: int | str, elapsed_s: float | None) -> None:
        ms = -1.0 if elapsed_s is None else elapsed_s * 1000
        access_log.info(
            "%s %s model=%s pod=%s %.1fms",
            decision.request.kind,
            status,
            decision.request.model,
            decision.target,
            ms,
            extra={
                "kind": decision.request.kind,
                "status": status,
                "model": decision.request.model,
                "pod": decision.target,
                "duration_ms": round(ms, 3),
            },
        )

    def complete_logged(decision: Any, usage: Any, elapsed_s: float, *args: Any) -> None:
        complete(decision, usage, elapsed_s, *args)
        line(decision, "ok", elapsed_s)

    def fail_logged(decision: Any, endpoint: str, kind: str, status: int = 0, **kw: Any) -> None:
        fail(decision, endpoint, kind, status, **kw)
        line(decision, status or kind, None)

    picker.complete = complete_logged  # type: ignore[method-assign]
    picker.fail = fail_logged  # type: ignore[method-assign]


def build_picker(
    server: PickerServer,
    scheduler: Scheduler,
    settings: ExtProcSettings,
    config: RouterConfig,
    previous: Picker | None = None,
) -> Picker:
    """The server's picker on `scheduler`. `previous`: the one it replaces (a reload): its
    tokenizer threads carry over, now preparing for `scheduler`."""
    picker = Picker(
        scheduler,
        settings,
        server.metrics,
        ChatTemplate.beside_tokenizer(config.blocks.tokenizer_path),
        passive_health=server.passive_health,
    )
    if previous is not None:
        picker.tokenize.close()
        picker.tokenize = previous.tokenize
        picker.tokenize.scheduler = scheduler
        picker.chat_template = previous.chat_template
    if config.logging.access_log:
        log_access(picker)
    if server.tracing is not None:
        PickerTracing(server.tracing).wrap(picker)
    return picker


def apply_serve_reload(server: PickerServer, config: RouterConfig, change: ConfigChange) -> None:
    """Build what `config` needs (raising leaves the server as it was), then swap it in."""
    fields = {
        name.split(".", 1)[1]: getattr(config.extproc, name.split(".", 1)[1])
        for name in change.live
        if name.startswith("extproc.")
    }
    settings = dataclasses.replace(server.settings, **fields) if fields else server.settings
    scheduler = server.scheduler
    if change.rebuild_scheduler:
        scheduler = server.build_scheduler(config, previous=server.scheduler)
    picker = server.picker
    if scheduler is not server.scheduler or fields or "logging.access_log" in change.live:
        picker = build_picker(server, scheduler, settings, config, previous=server.picker)
    # The swap: no await from here to the end.
    server.config = config
    server.settings = settings
    server.scheduler = scheduler
    server.picker = picker
    server.servicer.picker = picker
