"""OpenTelemetry tracing of requests (`tracing: {enabled: true}`), for both faces.

Imported only when tracing is on (the faces hold `None` otherwise, and check that one
attribute). A request is a SERVER span (continuing the client's W3C `traceparent` when it
sends one: it is trace context, not a routing instruction) with children:

- `parse`, `tokenize`, `schedule` (around `Scheduler.schedule`), and under `schedule` one span
  per filter, scorer and picker call. The scheduler itself stays free of OpenTelemetry: the
  plugins of its profiles are wrapped, as `envoy_extproc.metrics.time_plugins` wraps them for
  their timings, and its `schedule` by an instance attribute (`trace_scheduler`).
- `upstream` (a CLIENT span) around the exchange with the pod: its context goes to the pod as
  `traceparent` (the proxy sets it on the upstream request; the ext_proc picker adds it to
  the header mutation Envoy applies).

The request span and the `schedule` span carry the decision: `kvroute.model`, `kvroute.pick`,
`kvroute.prefill_pick`, `kvroute.profile`, `kvroute.prompt_tokens`, `kvroute.uncached_tokens`,
`kvroute.captured_tokens`. Spans go to an OTLP/HTTP collector (`tracing.endpoint`) in batches,
sampled at `tracing.sample_ratio` (a sampled parent is followed).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from router.ops_settings import TracingSettings

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


@dataclass(slots=True)
class RequestTrace:
    """One request's spans: its own, and the upstream spans still open."""

    span: Any
    #: The context tokens to restore at the end (None: the span was never made current).
    tokens: tuple[object, object] | None = None
    upstream: list[Any] = field(default_factory=list)


#: The request being traced in this task (set by `start_request`).
_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "kvroute_request_trace", default=None
)


def decision_attributes(decision: Any) -> dict[str, Any]:
    """The span attributes of a `router.scheduler.Decision`."""
    attrs: dict[str, Any] = {
        "kvroute.model": decision.request.model,
        "kvroute.pick": decision.target,
        "kvroute.profile": decision.profile,
        "kvroute.prompt_tokens": decision.prompt_tokens,
        "kvroute.uncached_tokens": decision.uncached_tokens,
        "kvroute.captured_tokens": decision.captured_tokens,
    }
    if decision.prefill is not None:
        attrs["kvroute.prefill_pick"] = decision.prefill
    return attrs


class RequestTracing:
    """A face's tracer: its own `TracerProvider` (not the process-global one)."""

    def __init__(
        self,
        settings: TracingSettings,
        exporter: SpanExporter | None = None,
        service_name: str = "kvroute",
    ) -> None:
        """`exporter`: where spans go (tests: the SDK's `InMemorySpanExporter`, exported at
        once); default an OTLP/HTTP exporter to `settings.endpoint`, in batches."""
        self.settings = settings
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}), sampler=sampler
        )
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint))
            )
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("kvroute")
        self.propagator = TraceContextTextMapPropagator()

    def shutdown(self) -> None:
        """Flush what is buffered and stop exporting."""
        self.provider.shutdown()

    # ------------------------------------------------------------------ request span
    def start_request(
        self, name: str, headers: Mapping[str, str], attach: bool = True
    ) -> RequestTrace:
        """Open the request's span (child of the client's `traceparent`, if any); `attach`:
        make it current in this task until `end_request` (else see `attached`)."""
        parent = self.propagator.extract(headers)
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        rt = RequestTrace(span)
        if attach:
            rt.tokens = self._attach(rt)
        return rt

    @staticmethod
    def _attach(rt: RequestTrace) -> tuple[object, object]:
        return otel_context.attach(trace.set_span_in_context(rt.span)), _current.set(rt)

    @staticmethod
    def _detach(tokens: tuple[object, object]) -> None:
        otel_context.detach(tokens[0])  # type: ignore[arg-type]
        _current.reset(tokens[1])  # type: ignore[arg-type]

    @contextmanager
    def attached(self, rt: RequestTrace) -> Iterator[RequestTrace]:
        """`rt` current inside the block (a request whose span outlives one call)."""
        tokens = self._attach(rt)
        try:
            yield rt
        finally:
            self._detach(tokens)

    def end_request(self, rt: RequestTrace, status: int) -> None:
        """Close the upstream spans still open and the request's span (status 0: no answer)."""
        for span in rt.upstream:
            span.set_attribute("http.response.status_code", status)
            span.end()
        rt.upstream.clear()
        rt.span.set_attribute("http.response.status_code", status)
        if status >= 500 or status == 0:
            rt.span.set_status(Status(StatusCode.ERROR))
        rt.span.end()
        if rt.tokens is not None:
            self._detach(rt.tokens)
            rt.tokens = None

    @staticmethod
    def current() -> RequestTrace | None:
        return _current.get()

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A child span of the current one, current itself inside the block."""
        with self.tracer.start_as_current_span(name, attributes=attributes or None) as span:
            yield span

    # ------------------------------------------------------------------ upstream
    def start_upstream(self, pod: str, parent: RequestTrace | None = None) -> tuple[Any, str]:
        """Open an `upstream` CLIENT span to `pod` under the request's span (kept open until
        the request ends); returns it and the `traceparent` value the pod must receive."""
        rt = parent or _current.get()
        ctx = trace.set_span_in_context(rt.span) if rt is not None else None
        span = self.tracer.start_span(
            "upstream",
            context=ctx,
            kind=SpanKind.CLIENT,
            attributes={"server.address": pod},
        )
        if rt is not None:
            rt.upstream.append(span)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier.get(TRACEPARENT, "")

    def fail_upstream(self, span: Any, error: BaseException) -> None:
        """The exchange with the pod failed before an answer: close its span as an error."""
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.record_exception(error)
        rt = _current.get()
        if rt is not None and span in rt.upstream:
            rt.upstream.remove(span)
        span.end()

    def trace_upstream(self, upstream: Any) -> None:
        """Wrap `upstream.open` (`router.proxy.upstream.Upstream`): each exchange is an
        `upstream` span, and the pod receives its `traceparent`."""
        inner = upstream.open

        async def open_traced(
            endpoint: str, path: str, body: bytes, headers: dict[str, str], *args: Any
        ) -> Any:
            span, traceparent = self.start_upstream(endpoint)
            headers = {k: v for k, v in headers.items() if k.lower() != TRACESTATE}
            headers[TRACEPARENT] = traceparent
            try:
                return await inner(endpoint, path, body, headers, *args)
            except BaseException as e:
                self.fail_upstream(span, e)
                raise

        upstream.open = open_traced

    # ------------------------------------------------------------------ scheduler
    def trace_scheduler(self, scheduler: Any) -> None:
        """Give `scheduler.schedule` a `schedule` span carrying the decision, and every
        filter, scorer and picker of its profiles a child span."""
        for profile in scheduler.profiles.values():
            pname = profile.name
            profile.filters = [_Traced(self, f, "filter", pname) for f in profile.filters]
            profile.scorers = [(_Traced(self, s, "scorer", pname), w) for s, w in profile.scorers]
            profile.picker = _Traced(self, profile.picker, "picker", pname)
        inner: Callable[..., Any] = scheduler.schedule

        def schedule_traced(*args: Any, **kwargs: Any) -> Any:
            if not _recording():
                return inner(*args, **kwargs)
            with self.tracer.start_as_current_span("schedule") as span:
                decision = inner(*args, **kwargs)
                if span.is_recording():
                    attrs = decision_attributes(decision)
                    span.set_attributes(attrs)
                    rt = _current.get()
                    if rt is not None:
                        rt.span.set_attributes(attrs)
                return decision

        scheduler.schedule = schedule_traced

    def trace_tokenize(self, worker: Any) -> None:
        """Give `TokenizeWorker.prepare` a `tokenize` span."""
        inner = worker.prepare

        async def prepare_traced(req: Any) -> None:
            if not _recording():
                await inner(req)
                return
            with self.tracer.start_as_current_span("tokenize"):
                await inner(req)

        worker.prepare = prepare_traced


_METHOD = {"filter": "filter", "picker": "pick"}


def _recording() -> bool:
    """True when the current span records (its request was sampled)."""
    return trace.get_current_span().is_recording()


class _Traced:
    """Stands in for a plugin: its one scheduling method in a span, the rest passed on."""

    def __init__(self, tracing: RequestTracing, plugin: Any, kind: str, profile: str) -> None:
        self._plugin = plugin
        method = _METHOD.get(kind) or (
            "score_details" if hasattr(plugin, "score_details") else "score"
        )
        self._call = getattr(plugin, method)
        self._start = tracing.tracer.start_as_current_span
        name = str(getattr(plugin, "name", type(plugin).__name__))
        self._span_name = f"{kind} {name}"
        self._attrs = {"kvroute.plugin": name, "kvroute.profile": profile}
        setattr(self, method, self._traced)

    def _traced(self, *args: Any) -> Any:
        if not _recording():  # an unsampled request: no child spans to make
            return self._call(*args)
        with self._start(self._span_name, attributes=self._attrs):
            return self._call(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plugin, name)
