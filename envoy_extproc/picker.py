"""Picker: what every ext_proc stream shares — the scheduler, the request parse, metrics.

Owns turning a request (path, headers, body bytes) into a `Decision` or a `RequestError`, the
path policy (`router.request.path_action`: only `request.routed_paths` reach a pod, the picker
answers `/v1/models` itself from the pool, every other path is a 404 from the picker), the
removal of router-only body fields a client sent (`clean_body`), and the outcome bookkeeping
(scheduler hooks + metrics) at the end of a request. Streams hold no shared state of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import msgspec

from envoy_extproc.metrics import PickerMetrics
from envoy_extproc.passive_health import PassiveHealth
from envoy_extproc.settings import ExtProcSettings
from router.request import (
    ChatTemplate,
    PathAction,
    RequestError,
    parse_request,
    path_action,
    strip_router_fields,
)
from router.scheduler import Decision, Scheduler
from router.tokenize_worker import TokenizeWorker

log = logging.getLogger(__name__)
_encode = msgspec.json.encode


class Picker:
    def __init__(
        self,
        scheduler: Scheduler,
        settings: ExtProcSettings | None = None,
        metrics: PickerMetrics | None = None,
        chat_template: ChatTemplate | None = None,
        clock: Callable[[], float] = time.monotonic,
        passive_health: PassiveHealth | None = None,
    ) -> None:
        self.scheduler = scheduler
        #: Ejects pods on the failures this picker sees (None = scrapes alone decide).
        self.passive_health = passive_health
        self.tokenize = TokenizeWorker(scheduler)
        self.settings = settings or ExtProcSettings()
        self.metrics = metrics or PickerMetrics()
        self.chat_template = chat_template
        self.clock = clock
        self.request_settings = scheduler.config.request
        self._adapters: frozenset[str] = frozenset()
        self._models: frozenset[str] = frozenset()
        self._adapters_version = -1

    # ------------------------------------------------------------------ routing
    async def route(
        self,
        body: bytes,
        path: str,
        headers: Mapping[str, str],
        subset: Collection[str] | None,
    ) -> Decision:
        """Parse and schedule; commit the decision (`on_pick`). Raises `RequestError`.

        Tokenizing a long prompt takes milliseconds: it runs in the scheduler's worker
        thread (`TokenizeWorker`) so other streams keep flowing meanwhile."""
        now = self.clock()
        model = "-"
        try:
            req = parse_request(
                body,
                path,
                headers,
                self.request_settings,
                self.chat_template,
                self._adapter_names(),
                now,
            )
            model = req.model
            await self.tokenize.prepare(req)
            decision = self.scheduler.schedule(req, subset=subset, now=now)
        except RequestError as e:
            self.metrics.refused(self._model_label(model), e.code)
            raise
        self.scheduler.on_pick(decision, now)
        self.metrics.routed(decision, len(body))
        return decision

    def path_action(self, method: str, path: str) -> PathAction:
        """The path policy; raises `RequestError` (404 unknown path, 405 wrong method)."""
        try:
            return path_action(method, path, self.request_settings)
        except RequestError as e:
            self.metrics.refused("-", e.code)
            raise

    def models_body(self) -> bytes:
        """`GET /v1/models` answered by the picker: the models and adapters of ready pods
        (503 when none is ready), so no pod endpoint but inference is ever exposed."""
        names: set[str] = set()
        for p in self.scheduler.registry.all():
            if p.healthy:
                names |= p.models | p.adapters
        if not names:
            self.metrics.errors.labels("-", "no_pod").inc()
            raise RequestError(503, "no ready pod to serve the request", "no_pod")
        data = [{"id": n, "object": "model", "owned_by": "kvroute"} for n in sorted(names)]
        return _encode({"object": "list", "data": data})

    def clean_body(self, decision: Decision) -> bytes | None:
        """The body to send on when the client's held router-only fields (now removed from
        `decision.request.body`); None when it held none and goes on unchanged."""
        body = decision.request.body
        stripped = strip_router_fields(body, self.request_settings.strip_fields)
        if not stripped:
            return None
        for name in stripped:
            self.metrics.stripped(name)
        return _encode(body)

    def destination(self, decision: Decision) -> str:
        """The header/metadata value: the target, or target plus fallbacks when configured."""
        if self.settings.fallbacks_in_header and decision.fallbacks:
            return ",".join(decision.endpoints)
        return decision.target

    # ------------------------------------------------------------------ outcome
    def first_token(self, decision: Decision, elapsed_s: float) -> None:
        self.scheduler.on_first_token(decision, self.clock())
        self.metrics.first_token(decision, elapsed_s)

    def complete(
        self,
        decision: Decision,
        usage: dict[str, Any] | None,
        elapsed_s: float,
        response_bytes: int | None = None,
        endpoint: str | None = None,
    ) -> None:
        """`response_bytes`: the body's length where it passed through the picker;
        `endpoint`: the pod that answered (default the target)."""
        self.scheduler.on_complete(decision, usage, self.clock())
        if self.passive_health is not None:
            self.passive_health.record_success(decision.target)
        self.metrics.completed(decision, usage, elapsed_s, response_bytes, endpoint)

    def fail(
        self,
        decision: Decision,
        endpoint: str,
        kind: str,
        status: int = 0,
        unreachable: bool = False,
    ) -> None:
        """The request failed on `endpoint`: `status` as Envoy reported it (0 = none, e.g. the
        client went away), `unreachable` when Envoy could not connect to the pod."""
        self.scheduler.on_failure(decision, endpoint, self.clock())
        if self.passive_health is not None:
            request_id = decision.request.request_id or f"picker-{id(decision)}"
            self.passive_health.record_failure(endpoint, status, request_id, unreachable)
        self.metrics.failed(decision, kind)

    def _adapter_names(self) -> frozenset[str]:
        self._refresh_names()
        return self._adapters

    def _model_label(self, model: str) -> str:
        """`model` for metric labels when a pod serves it, else "other" (clients must not be
        able to mint label values)."""
        self._refresh_names()
        return model if model in self._models else "other"

    def _refresh_names(self) -> None:
        registry = self.scheduler.registry
        if registry.version != self._adapters_version:
            adapters: set[str] = set()
            for p in registry:
                adapters |= p.adapters
            self._adapters = frozenset(adapters)
            self._models = frozenset(registry.models())
            self._adapters_version = registry.version
