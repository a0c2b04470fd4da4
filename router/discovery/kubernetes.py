"""Kubernetes discovery: the fleet is the ready pods matching a label selector in a namespace.

Owns the list + watch protocol against the API server (via `kubernetes_asyncio`) and the mapping
from a pod object to a `Pod`: endpoint `podIP:target_port`, role from a label (llm-d's
`llm-d.ai/role: prefill|decode|both`, absent = both), labels copied. Only ready pods are in the
registry: phase Running, a pod IP, condition Ready=True and not terminating (this is what an
InferencePool's endpoint picker considers). A pod that stops being ready leaves the registry
(taking its index entries) and comes back when ready again. With several `target_ports` (an
InferencePool's `targetPorts`) each ready pod is one endpoint per port. With `pool_name` the
selector and ports come from that InferencePool and follow its edits (`inference_pool.py`
calls `retarget`).

Protocol: list (remember `metadata.resourceVersion`), then watch from it with bookmarks; each
event updates the last seen resourceVersion. A watch that ends (server timeout, dropped
connection) resumes from that version; `410 Gone` (version compacted away) means events were
lost, so the whole set is listed again. Other errors retry with exponential backoff. Discovery
never dies on bad input: malformed events are counted and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from router.pods import Pod, PodRegistry, Role

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KubernetesDiscoverySettings:
    namespace: str = "default"
    #: The InferencePool's selector, e.g. "app=vllm-llama,llm-d.ai/inferenceServing=true".
    label_selector: str = ""
    #: The pool's target port: pods are reached at podIP:target_port.
    target_port: int = 8000
    #: All of an InferencePool's `targetPorts` (up to 8); when set, each ready pod is one
    #: endpoint per port and `target_port` is ignored. Port i's KV events are expected on
    #: `kv_events_port + i` (a data-parallel vLLM offsets its publisher port by rank).
    target_ports: tuple[int, ...] = ()
    #: Read selector and ports from this InferencePool (`inference_pool.py`) instead of
    #: `label_selector`/`target_port`, and follow its changes.
    pool_name: str | None = None
    role_label: str = "llm-d.ai/role"
    #: When pods bind their KV-event PUB (and replay ROUTER) on a fixed port, connect to it.
    kv_events_port: int | None = None
    kv_replay_port: int | None = None
    #: API server URL; None = kubeconfig (`kubeconfig` path or the default) or in-cluster config.
    api_server: str | None = None
    kubeconfig: str | None = None
    #: Bearer token for `api_server`.
    token: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    #: Server-side watch timeout; the watch then resumes from the last resourceVersion.
    watch_timeout_s: int = 300
    connect_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("target_port", "kv_events_port", "kv_replay_port"):
            port = getattr(self, name)
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"kubernetes discovery {name} must be in 1..65535, got {port}")
        for port in self.target_ports:
            if not 1 <= port <= 65535:
                raise ValueError(
                    f"kubernetes discovery target port must be in 1..65535, got {port}"
                )
        if len(self.target_ports) > 8 or len(set(self.target_ports)) != len(self.target_ports):
            raise ValueError(
                f"kubernetes discovery target_ports must be at most 8 distinct ports, "
                f"got {list(self.target_ports)}"
            )
        if not self.namespace:
            raise ValueError("kubernetes discovery namespace must not be empty")
        if self.watch_timeout_s < 1:
            raise ValueError("kubernetes discovery watch_timeout_s must be >= 1")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("kubernetes discovery backoff must satisfy 0 < initial <= max")


@dataclass(slots=True)
class KubernetesDiscoveryStats:
    lists: int = 0
    #: Relists forced by 410 Gone (the watch's resourceVersion was compacted away).
    expired: int = 0
    watch_events: int = 0
    bookmarks: int = 0
    errors: int = 0
    #: Pod objects that could not be turned into a Pod (e.g. unknown role value).
    rejected_pods: int = 0


class PodObjectError(ValueError):
    """A pod object from the API cannot be mapped to a Pod (the message says which field)."""


def pod_is_ready(obj: dict[str, Any]) -> bool:
    """Running, has an IP, condition Ready=True, and not being deleted."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    if not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def pod_from_object(obj: dict[str, Any], settings: KubernetesDiscoverySettings) -> Pod | None:
    """The Pod for a ready pod object, None for one that is not ready; PodObjectError if bad.

    With several `target_ports` this is the first port's endpoint; see `pods_from_object`."""
    pods = pods_from_object(obj, settings)
    return pods[0] if pods else None


def pods_from_object(obj: dict[str, Any], settings: KubernetesDiscoverySettings) -> list[Pod]:
    """One Pod per target port for a ready pod object, [] for one not ready; PodObjectError
    if bad."""
    if not pod_is_ready(obj):
        return []
    meta = obj.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    role_value = labels.get(settings.role_label, Role.BOTH.value)
    try:
        role = Role(role_value)
    except ValueError:
        raise PodObjectError(
            f"pod {meta.get('namespace')}/{meta.get('name')}: label {settings.role_label}="
            f"{role_value!r} is not one of {', '.join(r.value for r in Role)}"
        ) from None
    ip = obj["status"]["podIP"]
    host = f"[{ip}]" if ":" in ip else ip
    ev, rp = settings.kv_events_port, settings.kv_replay_port
    return [
        Pod(
            endpoint=f"{host}:{port}",
            role=role,
            labels=labels,
            kv_events_endpoint=f"tcp://{host}:{ev + i}" if ev else None,
            kv_replay_endpoint=f"tcp://{host}:{rp + i}" if rp else None,
        )
        for i, port in enumerate(settings.target_ports or (settings.target_port,))
    ]


async def api_client_from_settings(settings: KubernetesDiscoverySettings) -> client.ApiClient:
    """An ApiClient for `api_server` + token, else a kubeconfig, else in-cluster credentials."""
    cfg = client.Configuration()
    if settings.api_server:
        cfg.host = settings.api_server.rstrip("/")
        if settings.token:
            cfg.api_key = {"BearerToken": settings.token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        if settings.ca_file:
            cfg.ssl_ca_cert = settings.ca_file
        cfg.verify_ssl = settings.verify_tls
    elif settings.kubeconfig:
        await config.load_kube_config(config_file=settings.kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except ConfigException:
            await config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


def _identity(pod: Pod) -> tuple[object, ...]:
    return (
        pod.role,
        tuple(sorted(pod.labels.items())),
        pod.models,
        pod.adapters,
        pod.kv_events_endpoint,
        pod.kv_replay_endpoint,
    )


class KubernetesDiscovery:
    """Keeps `registry` equal to the ready pods selected by `settings` (start/stop)."""

    def __init__(
        self,
        registry: PodRegistry,
        settings: KubernetesDiscoverySettings,
        api_client: client.ApiClient | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.stats = KubernetesDiscoveryStats()
        #: Set once the first list has been applied to the registry.
        self.synced = asyncio.Event()
        self._api_client = api_client
        self._owns_client = api_client is None
        self._resource_version: str | None = None
        # namespace/name → Pods (one a port) of each ready pod; endpoint → identity of what
        # the registry holds.
        self._ready: dict[str, list[Pod]] = {}
        self._applied: dict[str, tuple[object, ...]] = {}
        self._rejected: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._pool: Any = None  # InferencePoolFollower when settings.pool_name is set

    async def start(self) -> None:
        if self._api_client is None:
            self._api_client = await api_client_from_settings(self.settings)
        if self.settings.pool_name:
            if self._pool is None:
                from router.discovery.inference_pool import InferencePoolFollower

                self._pool = InferencePoolFollower(self, self._api_client)
                self._pool.start()
        elif self._task is None:
            self._task = asyncio.create_task(self._run(), name="kubernetes-discovery")

    async def retarget(self, label_selector: str, target_ports: tuple[int, ...]) -> None:
        """Follow a new selector/port set (the InferencePool changed): list again and replace
        the registry's pods with those the new selector and ports give."""
        await self._stop_pods()
        self.settings = dataclasses.replace(
            self.settings, label_selector=label_selector, target_ports=target_ports
        )
        self._resource_version = None
        self._task = asyncio.create_task(self._run(), name="kubernetes-discovery")

    async def _stop_pods(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.stop()
            self._pool = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_client and self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    async def _run(self) -> None:
        delay = self.settings.backoff_initial_s
        while True:
            try:
                if self._resource_version is None:
                    await self._list()
                received = await self._watch()
                delay = self.settings.backoff_initial_s
                if not received:
                    # A watch closed with nothing in it: pause briefly rather than spin.
                    await asyncio.sleep(self.settings.backoff_initial_s)
                continue
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:
                    self.stats.expired += 1
                    log.info("kubernetes discovery: watch expired (410 Gone), listing again")
                    self._resource_version = None
                    continue
                reason = f"API error {exc.status}: {str(exc.reason)[:300]}"
            except Exception as exc:  # network, TLS, malformed stream: retry, never die
                reason = repr(exc)[:300]
            self.stats.errors += 1
            log.warning("kubernetes discovery: %s; retrying in %.2fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.backoff_max_s)

    def _core(self) -> client.CoreV1Api:
        assert self._api_client is not None, "start() first"
        return client.CoreV1Api(self._api_client)

    def _selector_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.settings.label_selector:
            kwargs["label_selector"] = self.settings.label_selector
        return kwargs

    async def _list(self) -> None:
        resp = await self._core().list_namespaced_pod(
            self.settings.namespace,
            _preload_content=False,
            _request_timeout=(self.settings.connect_timeout_s, self.settings.watch_timeout_s),
            **self._selector_kwargs(),
        )
        try:
            if resp.status != 200:
                raise ApiException(status=resp.status, reason=(await resp.text())[:300])
            body = await resp.json()
        finally:
            resp.release()
        ready: dict[str, list[Pod]] = {}
        for obj in body.get("items") or ():
            key, pods = self._convert(obj)
            if pods:
                ready[key] = pods
        self._ready = ready
        self._resource_version = str(body["metadata"]["resourceVersion"])
        self.stats.lists += 1
        desired = self._desired()
        self.registry.replace_all(list(desired.values()))
        self._applied = {ep: _identity(p) for ep, p in desired.items()}
        self.synced.set()
        log.info(
            "kubernetes discovery: %d ready pods in %s (resourceVersion %s)",
            len(desired),
            self.settings.namespace,
            self._resource_version,
        )

    async def _watch(self) -> int:
        """Follow events until the server ends the watch; return how many arrived."""
        received = 0
        started = time.monotonic()
        async with watch.Watch(return_type="object") as w:
            stream = w.stream(
                self._core().list_namespaced_pod,
                self.settings.namespace,
                resource_version=self._resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.settings.watch_timeout_s,
                # Read deadline a little past the server's own timeout, so a silently dead
                # connection is noticed.
                _request_timeout=(
                    self.settings.connect_timeout_s,
                    self.settings.watch_timeout_s + 10,
                ),
                **self._selector_kwargs(),
            )
            async for event in stream:
                received += 1
                self._on_event(event)
        log.debug(
            "kubernetes discovery: watch ended after %.1fs, %d events",
            time.monotonic() - started,
            received,
        )
        return received

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("raw_object"), dict):
            self.stats.errors += 1
            log.warning("kubernetes discovery: skipping malformed watch line %.200r", event)
            return
        kind = event.get("type")
        obj = event["raw_object"]
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.stats.bookmarks += 1
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.stats.watch_events += 1
            key, pods = self._convert(obj)
            if kind == "DELETED" or not pods:
                self._ready.pop(key, None)
            else:
                self._ready[key] = pods
            self._apply()
        else:
            self.stats.errors += 1
            log.warning("kubernetes discovery: unknown watch event type %r", kind)
        if rv:
            self._resource_version = str(rv)

    def _convert(self, obj: dict[str, Any]) -> tuple[str, list[Pod]]:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace', self.settings.namespace)}/{meta.get('name')}"
        try:
            pods = pods_from_object(obj, self.settings)
        except (PodObjectError, KeyError, TypeError, AttributeError) as exc:
            self.stats.rejected_pods += 1
            if key not in self._rejected:
                self._rejected.add(key)
                log.warning("kubernetes discovery: ignoring pod: %s", exc)
            return key, []
        self._rejected.discard(key)
        return key, pods

    def _desired(self) -> dict[str, Pod]:
        # Two pod objects can share an IP (a replacement scheduled before the old one's DELETED
        # event arrives); the endpoint is what the router routes to, so one entry wins.
        return {pod.endpoint: pod for pods in self._ready.values() for pod in pods}

    def _apply(self) -> None:
        desired = self._desired()
        for ep in [ep for ep in self._applied if ep not in desired]:
            del self._applied[ep]
            self.registry.remove(ep)
        for ep, pod in desired.items():
            ident = _identity(pod)
            if self._applied.get(ep) != ident:
                self._applied[ep] = ident
                self.registry.upsert(pod)
