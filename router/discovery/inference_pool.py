"""InferencePool-driven discovery: read the pod selector and target ports from a GAIE pool.

GAIE's endpoint picker is started with a pool's name and namespace and takes everything else
from the `InferencePool` (`inference.networking.k8s.io/v1`): `spec.selector.matchLabels` picks
the model-server pods, `spec.targetPorts[*].number` (1 to 8 ports) are the ports each of them
serves on, so every pod×port is one endpoint. Roles come from the pods' labels as before.

`InferencePoolFollower` lists the pool (by `metadata.name` field selector), then watches it;
each version of the spec that differs from the one applied re-targets the pod discovery
(`KubernetesDiscovery.retarget`: list again with the new selector, replace the fleet). A pool
that does not exist, or a cluster without the CRD, is reported in `error` and in the log in
words an operator can act on, and retried with backoff; the fleet stays empty (readiness
waits) until the pool is found. A pool deleted later keeps the last fleet: the route to it
is gone with it, and an accidental delete should not stop traffic that still arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

if TYPE_CHECKING:
    from router.discovery.kubernetes import KubernetesDiscovery

log = logging.getLogger(__name__)

GROUP = "inference.networking.k8s.io"
VERSION = "v1"
PLURAL = "inferencepools"
#: The CRD's own bound on `spec.targetPorts`.
MAX_TARGET_PORTS = 8
_SET_OPERATORS = {"In": "in", "NotIn": "notin"}


class InferencePoolError(ValueError):
    """An InferencePool object cannot be used (the message names the pool and the field)."""


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """What discovery needs from a pool: a label selector string and the ports."""

    label_selector: str
    target_ports: tuple[int, ...]


def _requirement(expr: Any, where: str) -> str:
    if not isinstance(expr, dict):
        raise InferencePoolError(f"{where}: expected a mapping, got {expr!r}")
    key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
    if not isinstance(key, str) or not key:
        raise InferencePoolError(f"{where}.key: expected a label name, got {key!r}")
    if op in _SET_OPERATORS:
        if not values:
            raise InferencePoolError(f"{where}.values: operator {op} needs at least one value")
        return f"{key} {_SET_OPERATORS[op]} ({','.join(str(v) for v in values)})"
    if op == "Exists":
        return key
    if op == "DoesNotExist":
        return f"!{key}"
    raise InferencePoolError(
        f"{where}.operator: {op!r} is not one of In, NotIn, Exists, DoesNotExist"
    )


def pool_target(obj: dict[str, Any]) -> PoolTarget:
    """The selector and ports of an InferencePool object; InferencePoolError naming the field."""
    meta = obj.get("metadata") or {}
    name = f"InferencePool {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InferencePoolError(f"{name}: spec is missing")
    selector = spec.get("selector")
    if not isinstance(selector, dict):
        raise InferencePoolError(f"{name}: spec.selector is missing (need matchLabels)")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise InferencePoolError(f"{name}: spec.selector.matchLabels must be a mapping")
    parts = [f"{k}={v}" for k, v in sorted(labels.items())]
    for i, expr in enumerate(selector.get("matchExpressions") or ()):
        parts.append(_requirement(expr, f"{name}: spec.selector.matchExpressions[{i}]"))
    if not parts:
        # An empty selector would select every pod of the namespace, the EPP included.
        raise InferencePoolError(f"{name}: spec.selector selects nothing (it is empty)")
    ports_spec = spec.get("targetPorts")
    if not isinstance(ports_spec, list) or not ports_spec:
        raise InferencePoolError(f"{name}: spec.targetPorts must list 1 to 8 ports")
    if len(ports_spec) > MAX_TARGET_PORTS:
        raise InferencePoolError(
            f"{name}: spec.targetPorts has {len(ports_spec)} ports, at most "
            f"{MAX_TARGET_PORTS} allowed"
        )
    ports: list[int] = []
    for i, entry in enumerate(ports_spec):
        number = entry.get("number") if isinstance(entry, dict) else None
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            raise InferencePoolError(
                f"{name}: spec.targetPorts[{i}].number must be a port in 1..65535, got {number!r}"
            )
        if number in ports:
            raise InferencePoolError(f"{name}: spec.targetPorts[{i}].number {number} repeated")
        ports.append(number)
    return PoolTarget(",".join(parts), tuple(ports))


@dataclass(slots=True)
class InferencePoolStats:
    lists: int = 0
    watch_events: int = 0
    #: Times the pod discovery was pointed at a new selector/port set.
    retargets: int = 0
    errors: int = 0
    #: Pool versions that could not be used (bad spec); the last good one stays.
    rejected: int = 0


class InferencePoolFollower:
    """Keeps `discovery` pointed at the selector and ports of its `settings.pool_name`."""

    def __init__(self, discovery: KubernetesDiscovery, api_client: client.ApiClient) -> None:
        self.discovery = discovery
        self.name = discovery.settings.pool_name or ""
        self.namespace = discovery.settings.namespace
        self.stats = InferencePoolStats()
        #: Why the pool is not being followed right now (None when it is), for operators.
        self.error: str | None = None
        self.target: PoolTarget | None = None
        self._api = client.CustomObjectsApi(api_client)
        self._resource_version: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pool(self) -> str:
        return f"InferencePool {self.namespace}/{self.name}"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="inference-pool")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _kwargs(self) -> dict[str, Any]:
        s = self.discovery.settings
        return {
            "field_selector": f"metadata.name={self.name}",
            "_request_timeout": (s.connect_timeout_s, s.watch_timeout_s + 10),
        }

    async def _run(self) -> None:
        s = self.discovery.settings
        delay = s.backoff_initial_s
        while True:
            try:
                if self._resource_version is None:
                    await self._list()
                if self.error is None:
                    delay = s.backoff_initial_s
                    await self._watch()
                    continue
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:
                    self._resource_version = None
                    continue
                self._fail(self._explain(exc))
            except Exception as exc:  # network, TLS, malformed stream: retry, never die
                self._fail(f"{self.pool}: cannot read it: {exc!r:.300}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.backoff_max_s)
            self._resource_version = None

    def _explain(self, exc: ApiException) -> str:
        if exc.status == 404:
            return (
                f"{self.pool}: the API server has no {PLURAL}.{GROUP}/{VERSION} resource; "
                "install GAIE's CRDs, or use --pool-selector/--pool-target-port instead"
            )
        if exc.status in (401, 403):
            return (
                f"{self.pool}: not allowed to list/watch {PLURAL}.{GROUP} in namespace "
                f"{self.namespace} (API {exc.status}); apply configs/kubernetes/rbac.yaml"
            )
        return f"{self.pool}: API error {exc.status}: {str(exc.reason)[:300]}"

    def _fail(self, reason: str) -> None:
        self.stats.errors += 1
        if reason != self.error:
            log.warning("inference pool discovery: %s; retrying", reason)
        self.error = reason

    async def _list(self) -> None:
        body = await self._api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, **self._kwargs()
        )
        self.stats.lists += 1
        self._resource_version = str(body["metadata"]["resourceVersion"])
        items = [i for i in body.get("items") or () if i["metadata"].get("name") == self.name]
        if not items:
            self._fail(
                f"{self.pool} not found (kubectl get {PLURAL}.{GROUP} -n {self.namespace}); "
                "waiting for it to be created"
            )
            return
        await self._apply(items[0])

    async def _watch(self) -> None:
        s = self.discovery.settings
        async with watch.Watch(return_type="object") as w:
            stream = w.stream(
                self._api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                resource_version=self._resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=s.watch_timeout_s,
                **self._kwargs(),
            )
            async for event in stream:
                obj = event.get("raw_object") if isinstance(event, dict) else None
                if not isinstance(obj, dict):
                    self.stats.errors += 1
                    continue
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self._resource_version = str(rv)
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED"):
                    self.stats.watch_events += 1
                    await self._apply(obj)
                elif kind == "DELETED":
                    self.stats.watch_events += 1
                    self._fail(f"{self.pool} was deleted; keeping its last pods until it returns")

    async def _apply(self, obj: dict[str, Any]) -> None:
        try:
            target = pool_target(obj)
        except InferencePoolError as exc:
            self.stats.rejected += 1
            self._fail(f"{exc}; keeping the last good spec")
            return
        self.error = None
        if target == self.target:
            return
        log.info(
            "inference pool discovery: %s selects %r on ports %s",
            self.pool,
            target.label_selector,
            ",".join(map(str, target.target_ports)),
        )
        self.target = target
        self.stats.retargets += 1
        await self.discovery.retarget(target.label_selector, target.target_ports)
