"""One proxied request: parse → admit → schedule → (prefill leg) → forward → relay → report.

The proxy's hot path, written against raw ASGI so a request costs little beyond the scheduler.
Scheduler hooks: `on_pick` once the decision is taken, `on_first_token` at the pod's first
body byte, `on_complete` with the usage of the final body or last SSE chunk, `on_failure` when a
pod fails (then a retry is scheduled among the remaining pods).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import msgspec

from router.proxy.admission import AdmissionQueue
from router.proxy.errors import UpstreamFailure
from router.proxy.health import HealthProber
from router.proxy.metrics import ProxyMetrics
from router.proxy.pd import PrefillFailed, decode_body, run_prefill
from router.proxy.relay import (
    BrokenStream,
    ClientLeft,
    ClientWatch,
    Delivered,
    Receive,
    Scope,
    Send,
    deliver_full,
    deliver_stream,
    read_body,
    send_error,
    send_full,
)
from router.proxy.settings import ProxySettings
from router.proxy.upstream import StatusFailure, Upstream, forwarded_headers
from router.request import (
    ChatTemplate,
    RequestError,
    RequestSettings,
    RoutingRequest,
    parse_request,
    strip_router_fields,
)
from router.scheduler import Decision, Scheduler
from router.tokenize_worker import TokenizeWorker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Attempt:
    decision: Decision
    #: The pod the body goes to now (decision.target, or a retry's pick).
    endpoint: str


class Forwarder:
    def __init__(
        self,
        scheduler: Scheduler,
        upstream: Upstream,
        settings: ProxySettings,
        metrics: ProxyMetrics,
        prober: HealthProber,
        chat_template: ChatTemplate | None = None,
        adapters: Container[str] = frozenset(),
    ) -> None:
        self.scheduler = scheduler
        self.tokenize = TokenizeWorker(scheduler)
        self.upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self.prober = prober
        self.chat_template = chat_template
        self.adapters = adapters
        self.request_settings: RequestSettings = scheduler.config.request
        self.admission = AdmissionQueue(
            settings.max_inflight_per_model,
            settings.max_queued_per_model,
            settings.queue_timeout_s,
        )
        self._debug_header = settings.debug_header.lower()
        self._models: tuple[int, set[str]] = (-1, set())
        self._inflight: dict[str, Any] = {}
        self._decision_header = settings.decision_header.lower().encode()
        #: `router.request.parse_request`, or a traced stand-in (`router.tracing`).
        self.parse = parse_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrival = time.perf_counter()
        path: str = scope["path"]
        model = "unknown"
        status = 500
        watch: ClientWatch | None = None
        try:
            raw = await read_body(
                receive, self.request_settings.max_body_bytes, self.settings.body_read_timeout_s
            )
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
            req = self.parse(
                raw,
                path,
                hdrs,
                self.request_settings,
                self.chat_template,
                self.adapters,
                now=self.scheduler.clock(),
            )
            # Router-only fields (kv_transfer_params...) never come from a client.
            stripped = strip_router_fields(req.body, self.request_settings.strip_fields)
            if stripped:
                for name in stripped:
                    self.metrics.stripped_fields.labels(name).inc()
                    self.metrics.face.stripped(name)
                raw = _encode(req.body)
            model = req.model if req.model in self._known_models() else "other"
            debug = hdrs.get(self._debug_header) == "1"
            watch = ClientWatch(receive)
            # Keyed by the metric label: a client's made-up model names cannot grow the gates.
            await self.admission.acquire(model, req.sheddable)
            inflight = self._inflight_gauge(model)
            inflight.inc()
            try:
                status = await self._route(req, raw, path, headers, send, watch, debug, arrival)
            finally:
                inflight.dec()
                self.admission.release(model)
        except RequestError as err:
            status = err.status
            self.metrics.face.refused("-" if model == "unknown" else model, err.code)
            if err.status in (408, 429):
                self.metrics.rejected.labels(err.code).inc()
            await send_error(send, err, self.settings.retry_after_s)
        except ClientLeft as left:
            # Routine: a client gave up (closed its socket) before its body was all sent.
            status = 499
            self.metrics.client_disconnects.inc()
            log.info("%s %s: %s", scope["method"], path, left)
        except asyncio.CancelledError:
            if watch is None or not watch.absorb_cancel():
                raise
            status = 499
            self.metrics.client_disconnects.inc()
        finally:
            if watch is not None:
                watch.close()
            self.metrics.count_request(model, status)
            self.metrics.duration.observe(time.perf_counter() - arrival)

    def _inflight_gauge(self, model: str) -> Any:
        gauge = self._inflight.get(model)
        if gauge is None:
            gauge = self._inflight[model] = self.metrics.inflight.labels(model)
        return gauge

    def _known_models(self) -> set[str]:
        """Models of the fleet (metric labels stay bounded whatever clients send)."""
        reg = self.scheduler.registry
        if self._models[0] != reg.version:
            self._models = (reg.version, reg.models())
        return self._models[1]

    # ------------------------------------------------------------------ routing
    async def _route(
        self,
        req: RoutingRequest,
        raw: bytes,
        path: str,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        watch: ClientWatch,
        debug: bool,
        arrival: float,
    ) -> int:
        sched = self.scheduler
        await self.tokenize.prepare(req)
        if req.tokenize_s is not None:
            self.metrics.tokenize_seconds.observe(req.tokenize_s)
        t0 = time.perf_counter()
        try:
            decision = sched.schedule(req, self.settings.profile)
        except RequestError as err:
            # Every pod of the model ejected: try the one ejected longest ago, not a 503.
            if err.code != "no_healthy_pod" or not self._readmit_one(req.model):
                raise
            decision = sched.schedule(req, self.settings.profile)
        self.metrics.schedule_seconds.observe(time.perf_counter() - t0)
        sched.on_pick(decision)
        self.metrics.face.routed(decision, len(raw))
        attempt = _Attempt(decision, decision.target)
        try:
            return await self._forward(
                req, attempt, raw, path, headers, send, watch, debug, arrival
            )
        except asyncio.CancelledError:
            # The client left: the pod's work ends with the dropped connection.
            sched.on_complete(attempt.decision, None)
            self.metrics.face.failed(attempt.decision, "client_disconnect")
            raise

    async def _forward(
        self,
        req: RoutingRequest,
        attempt: _Attempt,
        raw: bytes,
        path: str,
        headers: list[tuple[bytes, bytes]],
        send: Send,
        watch: ClientWatch,
        debug: bool,
        arrival: float,
    ) -> int:
        sched = self.scheduler
        decision = attempt.decision
        extra: list[tuple[bytes, bytes]] = []
        if debug:
            extra.append((self._decision_header, _decision_summary(decision)))
        fwd_headers = forwarded_headers(headers)
        deadline = asyncio.get_running_loop().time() + self.settings.total_timeout_s
        body = raw
        if decision.prefill is not None:
            body = await self._prefill(decision, req.body, path, fwd_headers)
        retries_left = self.settings.retries
        first_byte = self.settings.first_byte_timeout_s
        answered_5xx = 0
        while True:
            ep = attempt.endpoint
            try:
                opened = await self.upstream.open(
                    ep, path, body, fwd_headers, req.stream, first_byte
                )
            except UpstreamFailure as f:
                self._pod_failed(attempt.decision, f)
                if isinstance(f, StatusFailure):
                    answered_5xx += 1
                # Two pods failing a request alike point at the request: answer what they said.
                retry = f.retryable and answered_5xx < 2
                nxt = self._retry(attempt, f, retries_left) if retry else None
                if nxt is None:
                    self.metrics.face.failed(attempt.decision, f"upstream_{f.kind}")
                    return await self._answer_failure(send, f, extra)
                retries_left -= 1
                attempt.decision, attempt.endpoint = nxt.decision, nxt.endpoint
                continue
            break
        self.prober.record_success(attempt.endpoint)
        if attempt.decision is not decision and debug:
            extra[0] = (self._decision_header, _decision_summary(attempt.decision))
        d = attempt.decision
        self.metrics.ttft.observe(time.perf_counter() - arrival)
        face = self.metrics.face

        def first_token() -> None:
            sched.on_first_token(d)
            face.first_token(d, time.perf_counter() - arrival)

        try:
            if req.stream and opened.status == 200:
                result: Delivered = await deliver_stream(
                    opened,
                    send,
                    deadline,
                    extra,
                    watch,
                    first_token,
                    self.settings.stream_idle_timeout_s,
                )
            else:
                first_token()
                result = await deliver_full(opened, send, deadline, extra, watch)
        except BrokenStream as f:
            # The client saw a 200 and then an error event: counted as such, apart.
            self._pod_failed(d, f)
            self.metrics.stream_errors.labels(_STREAM_ERROR_REASONS.get(f.kind, f.kind)).inc()
            face.failed(d, f"upstream_{f.kind}")
            log.info("stream of %s broken: %s", req.request_id, f)
            return 200
        except UpstreamFailure as f:
            self._pod_failed(d, f)
            face.failed(d, f"upstream_{f.kind}")
            return await self._answer_failure(send, f, extra)
        sched.on_complete(d, result.usage)
        face.completed(d, result.usage, time.perf_counter() - arrival, None, attempt.endpoint)
        return result.status

    async def _prefill(
        self, decision: Decision, body: dict, path: str, headers: dict[str, str]
    ) -> bytes:
        assert decision.prefill is not None
        try:
            params = await run_prefill(
                self.upstream,
                decision.prefill,
                path,
                body,
                headers,
                self.settings.first_byte_timeout_s,
            )
        except PrefillFailed as e:
            self.scheduler.on_prefill_done(decision)
            self.metrics.pd_requests.labels("prefill_failed").inc()
            if e.failure is not None:
                self.metrics.upstream_failures.labels(e.failure.endpoint, e.failure.kind).inc()
                self.prober.record_failure(e.failure, decision.request.request_id)
            log.info("prefill on %s failed, decoding locally: %s", decision.prefill, e.reason)
            return decode_body(body, None)
        self.scheduler.on_prefill_done(decision)
        self.metrics.pd_requests.labels("two_phase").inc()
        return decode_body(body, params)

    def _pod_failed(self, decision: Decision, f: UpstreamFailure) -> None:
        self.metrics.upstream_failures.labels(f.endpoint, f.kind).inc()
        self.scheduler.on_failure(decision, f.endpoint)
        self.prober.record_failure(f, decision.request.request_id)

    def _readmit_one(self, model: str) -> bool:
        """Let the least recently ejected pod of `model` back in; False if there is none."""
        pods = [p.endpoint for p in self.scheduler.registry.all() if p.serves(model)]
        return self.prober.readmit_least_recently_ejected(pods) is not None

    def _retry(self, attempt: _Attempt, f: UpstreamFailure, retries_left: int) -> _Attempt | None:
        if retries_left <= 0:
            return None
        d = attempt.decision
        remaining = [ep for ep in d.fallbacks if ep != f.endpoint]
        try:
            nd = self.scheduler.schedule(d.request, self.settings.profile, subset=remaining or None)
        except RequestError:
            return None
        if nd.target == f.endpoint:
            return None
        # The KV of a finished prefill leg stays where it is; the new decode pod pulls it too.
        nd.prefill = None
        self.scheduler.on_pick(nd)
        self.metrics.retries.inc()
        log.info("retrying %s on %s after %s", d.request.request_id, nd.target, f.kind)
        return _Attempt(nd, nd.target)

    async def _answer_failure(
        self, send: Send, f: UpstreamFailure, extra: list[tuple[bytes, bytes]]
    ) -> int:
        if isinstance(f, StatusFailure):
            # Nothing better to say than what the pod said.
            body = f.body
            if not body.lstrip().startswith(b"{"):
                err = f.to_request_error()
                await send_error(send, err, extra=extra)
                return err.status
            await send_full(send, f.status, [(b"content-type", b"application/json"), *extra], body)
            return f.status
        err = f.to_request_error()
        await send_error(send, err, extra=extra)
        return err.status


_encode = msgspec.json.encode

#: `kvroute_proxy_stream_errors_total{reason}` per failure kind.
_STREAM_ERROR_REASONS = {
    "broken_stream": "pod_closed",
    "timeout_idle": "idle_timeout",
    "timeout_total": "total_timeout",
}


def _details(details: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A scorer's own figures (e.g. predicted TTFT and its parts, seconds), when it gives them."""
    if not details:
        return {}
    return {"details": {n: {k: round(v, 4) for k, v in d.items()} for n, d in details.items()}}


def _decision_summary(d: Decision, top: int = 3) -> bytes:
    """The `x-kvroute-decision` header: pick, prefill pick, profile and the best scores."""
    main = d.results.get(d.profile)
    pods = sorted(main.pods, key=lambda s: -s.total)[:top] if main else []
    return _encode(
        {
            "pick": d.target,
            "prefill": d.prefill,
            "profile": d.profile,
            "top": [
                {"pod": s.endpoint, "score": round(s.total, 4), "hit": round(s.prefix_hit, 4)}
                | _details(s.details)
                for s in pods
            ],
        }
        | ({"shadows": d.shadow_report()} if d.shadows else {})
    )
