"""What the proxy adds around its hot path when asked: tracing spans and the access log.

`build_forwarder` is how `ProxyApp` makes its `Forwarder`, at start-up and on a config reload
(`router.proxy.reload`). With tracing off and `logging.access_log: false` it returns the
`Forwarder` itself: nothing is wrapped and a request costs what it did. Otherwise it returns an
`ObservedForwarder`, an ASGI stand-in that opens the request's span (`router.tracing`) and/or
writes one access-log line per request (`kvroute.access`: method, path, status, model, pod,
duration) and passes everything else to the `Forwarder`.

The model and pod of the access line come from the last decision `Scheduler.schedule` took in
the request's task (a retry's pick replaces the first): `note_decisions` wraps the schedule
method of the scheduler the forwarder uses.
"""

from __future__ import annotations

import contextvars
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.log_setup import ACCESS_LOGGER
from router.proxy.forward import Forwarder
from router.proxy.relay import Receive, Scope, Send
from router.proxy.settings import ProxySettings
from router.scheduler import Scheduler

if TYPE_CHECKING:
    from router.proxy.app import ProxyApp
    from router.tracing import RequestTracing

access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass(slots=True)
class _Note:
    model: str = "-"
    pod: str = "-"


_note: contextvars.ContextVar[_Note | None] = contextvars.ContextVar(
    "kvroute_access_note", default=None
)


#: Schedulers whose decisions are noted already (a reload may keep the scheduler).
_noted: weakref.WeakSet[Scheduler] = weakref.WeakSet()


def note_decisions(scheduler: Scheduler) -> None:
    """Record the model and pick of each decision `scheduler.schedule` returns in the request
    being served (for its access-log line)."""
    inner: Callable[..., Any] = scheduler.schedule

    def schedule_noted(*args: Any, **kwargs: Any) -> Any:
        decision = inner(*args, **kwargs)
        note = _note.get()
        if note is not None:
            note.model = decision.request.model
            note.pod = decision.target
        return decision

    scheduler.schedule = schedule_noted  # type: ignore[method-assign]


class ObservedForwarder:
    """A `Forwarder` with the request's span around it and/or its access-log line after it."""

    def __init__(self, forwarder: Forwarder, tracing: RequestTracing | None, access: bool) -> None:
        self.inner = forwarder
        self.tracing = tracing
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 0

        async def send_seen(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        note = _Note()
        token = _note.set(note)
        tracing = self.tracing
        rt = None
        if tracing is not None:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            rt = tracing.start_request(f"{scope['method']} {scope['path']}", headers)
        try:
            await self.inner(scope, receive, send_seen)
        finally:
            if rt is not None and tracing is not None:
                tracing.end_request(rt, status)
            _note.reset(token)
            if self.access:
                access_log.info(
                    "%s %s %d model=%s pod=%s %.1fms",
                    scope["method"],
                    scope["path"],
                    status,
                    note.model,
                    note.pod,
                    (time.perf_counter() - start) * 1000,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "model": note.model,
                        "pod": note.pod,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    },
                )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def unwrap(forwarder: Any) -> Forwarder:
    return forwarder.inner if isinstance(forwarder, ObservedForwarder) else forwarder


def build_forwarder(
    app: ProxyApp,
    scheduler: Scheduler,
    settings: ProxySettings,
    access: bool,
    previous: Any = None,
) -> Forwarder | ObservedForwarder:
    """The app's forwarder on `scheduler`. `previous`: the one it replaces (a reload): its
    admission gates and tokenizer threads carry over (requests queued or in flight keep
    their places); the new forwarder's tokenizer worker serves `scheduler`."""
    assert app.upstream is not None and app.prober is not None
    adapters = frozenset().union(*(p.adapters for p in app.registry.all()))
    fwd = Forwarder(
        scheduler,
        app.upstream,
        settings,
        app.metrics,
        app.prober,
        app.chat_template,
        adapters,
    )
    tracing = app.tracing
    if previous is not None:
        old = unwrap(previous)
        fwd.tokenize.close()
        fwd.tokenize = old.tokenize
        fwd.tokenize.scheduler = scheduler
        fwd.admission = old.admission
        fwd.adapters = old.adapters
    elif tracing is not None:
        tracing.trace_tokenize(fwd.tokenize)
    if tracing is not None:
        parse = fwd.parse

        def parse_traced(*args: Any, **kwargs: Any) -> Any:
            with tracing.span("parse"):
                return parse(*args, **kwargs)

        fwd.parse = parse_traced
    if access and scheduler not in _noted:
        note_decisions(scheduler)
        _noted.add(scheduler)
    if tracing is None and not access:
        return fwd
    return ObservedForwarder(fwd, tracing, access)
