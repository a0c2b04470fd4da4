"""A FAKE Kubernetes API server for discovery tests, and its fixture.

Why a fake: there is no cluster (nor kind/minikube) on this machine and tests may only use
loopback. The fake is not a mock of our code: it is a separate HTTP server on 127.0.0.1 that
speaks the real API wire protocol the `kubernetes_asyncio` client talks, for the one resource
discovery uses, `GET /api/v1/namespaces/{ns}/pods`:

- list: a `PodList` JSON with `metadata.resourceVersion`, filtered by `labelSelector`
  (equality `k=v`/`k==v`/`k!=v`, existence `k`/`!k`, sets `k in (a,b)`/`k notin (a,b)`);
- `watch=true`: a chunked response of newline-delimited JSON events `{"type", "object"}` starting
  after `resourceVersion` (an empty or "0" version first replays the current pods as ADDED),
  `BOOKMARK` events when `allowWatchBookmarks=true`, DELETED/ADDED when a label change moves a
  pod out of/into the selector, the stream closed after `timeoutSeconds`, and an `ERROR` event
  carrying a `Status` with code 410 (reason Expired) when the version was compacted away;
- bearer-token check (401 Status) when a token is configured.

It also serves GAIE's `InferencePool` custom object, `GET /apis/inference.networking.k8s.io/v1/
namespaces/{ns}/inferencepools`: list and watch (resume after `resourceVersion`, ADDED/MODIFIED/
DELETED, `timeoutSeconds`), filtered by `fieldSelector=metadata.name=NAME`; with
`crd_installed = False` it answers 404 NotFound as an API server without the CRD does.

Mutations (`put_pod`, `set_ready`, `delete_pod`) bump a global resourceVersion like etcd does.
`lose_events()` mimics a watch that missed events: mutations inside it reach history but no live
watcher, then history is compacted and live watches are cut, so a resume gets 410.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

_SET_REQ = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    cur = ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for req in _split_selector(selector):
        m = _SET_REQ.match(req)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            inside = key in labels and labels[key] in values
            if inside != (op == "in"):
                return False
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in req:
            key, value = (s.strip() for s in re.split(r"==?", req, maxsplit=1))
            if labels.get(key) != value:
                return False
        elif req.startswith("!"):
            if req[1:].strip() in labels:
                return False
        elif req not in labels:
            return False
    return True


def parse_bool(value: str | None) -> bool:
    """Query booleans as the API server (Go's strconv.ParseBool) reads them."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def make_pod(
    name: str,
    ip: str | None,
    labels: dict[str, str] | None = None,
    *,
    namespace: str = "default",
    ready: bool = True,
    phase: str = "Running",
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "Ready", "status": "True" if ready else "False"},
            {"type": "PodScheduled", "status": "True"},
        ],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "labels": dict(labels or {}),
        },
        "spec": {"containers": [{"name": "vllm", "ports": [{"containerPort": 8000}]}]},
        "status": status,
    }


@dataclass
class _Change:
    rv: int
    kind: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(eq=False)
class _Watcher:
    namespace: str
    selector: str
    bookmarks: bool
    queue: asyncio.Queue[_Change | None] = field(default_factory=asyncio.Queue)


class FakeKubeApi:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[dict[str, str]] = []
        #: Respond 500 to this many upcoming requests (API server hiccups).
        self.fail_next = 0
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._rv = 100
        self._history: list[_Change] = []
        self._compacted_rv = 0
        self._watchers: set[_Watcher] = set()
        self._silent = False
        self._runner: web.AppRunner | None = None
        self.url = ""
        #: False: the InferencePool CRD is not installed (its path is a 404).
        self.crd_installed = True
        self.pool_requests: list[dict[str, str]] = []
        self._pools: dict[tuple[str, str], dict[str, Any]] = {}
        self._pool_history: list[_Change] = []
        self._pool_watchers: set[asyncio.Queue[_Change | None]] = set()

    def watch_requests(self) -> list[dict[str, str]]:
        """Query parameters of every watch request received, oldest first."""
        return [r for r in self.requests if parse_bool(r.get("watch"))]

    def list_requests(self) -> list[dict[str, str]]:
        return [r for r in self.requests if not parse_bool(r.get("watch"))]

    # --- server lifecycle -------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods_handler)
        app.router.add_get(
            "/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools",
            self._pools_handler,
        )
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- cluster mutations ------------------------------------------------------------------
    def put_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        old = self._pods.get(key)
        self._commit("MODIFIED" if old is not None else "ADDED", copy.deepcopy(pod), old)

    def add_pod(
        self,
        name: str,
        ip: str | None,
        labels: dict[str, str] | None = None,
        *,
        namespace: str = "default",
        ready: bool = True,
        phase: str = "Running",
    ) -> None:
        self.put_pod(make_pod(name, ip, labels, namespace=namespace, ready=ready, phase=phase))

    def set_ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        pod = copy.deepcopy(self._pods[(namespace, name)])
        for cond in pod["status"]["conditions"]:
            if cond["type"] in ("Ready", "ContainersReady"):
                cond["status"] = "True" if ready else "False"
        self.put_pod(pod)

    def set_labels(self, name: str, labels: dict[str, str], namespace: str = "default") -> None:
        pod = copy.deepcopy(self._pods[(namespace, name)])
        pod["metadata"]["labels"] = dict(labels)
        self.put_pod(pod)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        old = self._pods[(namespace, name)]
        self._commit("DELETED", copy.deepcopy(old), old)

    def bookmark(self) -> int:
        """Advance the version without a pod change and tell bookmark-enabled watchers."""
        self._rv += 1
        for w in self._watchers:
            if w.bookmarks:
                w.queue.put_nowait(_Change(self._rv, "BOOKMARK", {}, None))
        return self._rv

    @contextlib.contextmanager
    def lose_events(self) -> Iterator[None]:
        """Mutations inside reach no live watcher; afterwards history is compacted and live
        watches are cut, so a client resuming from its last version gets 410 Gone."""
        self._silent = True
        try:
            yield
        finally:
            self._silent = False
            self._compacted_rv = self._rv
            self._history.clear()
            self.drop_watches()

    def drop_watches(self) -> None:
        for w in list(self._watchers):
            w.queue.put_nowait(None)
        for q in list(self._pool_watchers):
            q.put_nowait(None)

    # --- InferencePool custom objects -------------------------------------------------------
    def put_pool(self, pool: dict[str, Any]) -> None:
        """Create or replace an InferencePool (as `kubectl apply` would)."""
        obj = copy.deepcopy(pool)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        kind = "MODIFIED" if key in self._pools else "ADDED"
        self._pools[key] = obj
        self._pool_event(_Change(self._rv, kind, obj, None))

    def delete_pool(self, name: str, namespace: str = "default") -> None:
        obj = self._pools.pop((namespace, name))
        self._rv += 1
        self._pool_event(_Change(self._rv, "DELETED", obj, None))

    def _pool_event(self, change: _Change) -> None:
        self._pool_history.append(change)
        for q in self._pool_watchers:
            q.put_nowait(change)

    async def _pools_handler(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        namespace = request.match_info["namespace"]
        self.pool_requests.append({"namespace": namespace, **q})
        if not self.crd_installed:
            return web.json_response(
                self._status(404, "NotFound", "the server could not find the requested resource"),
                status=404,
            )
        name = None
        field_selector = q.get("fieldSelector", "")
        if field_selector:
            key, _, value = field_selector.partition("=")
            if key != "metadata.name":
                return web.json_response(
                    self._status(400, "BadRequest", f"field label not supported: {key}"),
                    status=400,
                )
            name = value

        def wanted(obj: dict[str, Any]) -> bool:
            meta = obj["metadata"]
            return meta["namespace"] == namespace and name in (None, meta["name"])

        if not parse_bool(q.get("watch")):
            items = [copy.deepcopy(o) for _, o in sorted(self._pools.items()) if wanted(o)]
            return web.json_response(
                {
                    "kind": "InferencePoolList",
                    "apiVersion": "inference.networking.k8s.io/v1",
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": items,
                }
            )
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        since = int(q.get("resourceVersion") or 0)
        queue: asyncio.Queue[_Change | None] = asyncio.Queue()
        for change in self._pool_history:
            if change.rv > since:
                queue.put_nowait(change)
        self._pool_watchers.add(queue)
        timeout = float(q["timeoutSeconds"]) if "timeoutSeconds" in q else None
        try:
            async with asyncio.timeout(timeout):
                while (change := await queue.get()) is not None:
                    if wanted(change.obj):
                        line = json.dumps({"type": change.kind, "object": change.obj})
                        await resp.write(line.encode() + b"\n")
        except TimeoutError:
            pass
        except ConnectionResetError:
            return resp
        finally:
            self._pool_watchers.discard(queue)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    def _commit(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            del self._pods[key]
        else:
            self._pods[key] = obj
        change = _Change(self._rv, kind, obj, old)
        self._history.append(change)
        if not self._silent:
            for w in self._watchers:
                w.queue.put_nowait(change)

    # --- protocol ---------------------------------------------------------------------------
    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    @staticmethod
    def _visible(change: _Change, namespace: str, selector: str) -> tuple[str, dict] | None:
        """The event a watcher with this namespace/selector sees for `change`, if any."""
        if change.kind == "BOOKMARK":
            return "BOOKMARK", {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(change.rv)},
            }
        if change.obj["metadata"]["namespace"] != namespace:
            return None
        now = change.kind != "DELETED" and selector_matches(
            selector, change.obj["metadata"]["labels"]
        )
        before = change.old is not None and selector_matches(
            selector, change.old["metadata"]["labels"]
        )
        if change.kind == "DELETED":
            return ("DELETED", change.obj) if before else None
        if now and before:
            return "MODIFIED", change.obj
        if now:
            return "ADDED", change.obj
        if before:
            return "DELETED", change.obj
        return None

    async def _pods_handler(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        namespace = request.match_info["namespace"]
        self.requests.append({"namespace": namespace, **q})
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return web.json_response(self._status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response(
                self._status(500, "InternalError", "etcd unavailable"), status=500
            )
        selector = q.get("labelSelector", "")
        if not parse_bool(q.get("watch")):
            items = []
            for (ns, _), pod in sorted(self._pods.items()):
                if ns == namespace and selector_matches(selector, pod["metadata"]["labels"]):
                    item = copy.deepcopy(pod)
                    del item["kind"], item["apiVersion"]  # list items carry neither
                    items.append(item)
            return web.json_response(
                {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": items,
                }
            )
        return await self._watch(request, namespace, selector)

    async def _watch(
        self, request: web.Request, namespace: str, selector: str
    ) -> web.StreamResponse:
        q = request.query
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        rv_param = q.get("resourceVersion", "")
        watcher = _Watcher(namespace, selector, parse_bool(q.get("allowWatchBookmarks")))
        if rv_param in ("", "0"):
            for (ns, _), pod in sorted(self._pods.items()):
                if ns == namespace and selector_matches(selector, pod["metadata"]["labels"]):
                    await send("ADDED", pod)
        else:
            since = int(rv_param)
            if since < self._compacted_rv:
                message = f"too old resource version: {since} ({self._compacted_rv})"
                await send("ERROR", self._status(410, "Expired", message))
                await resp.write_eof()
                return resp
            for change in self._history:
                if change.rv > since:
                    visible = self._visible(change, namespace, selector)
                    if visible is not None:
                        await send(*visible)
        self._watchers.add(watcher)
        timeout = float(q["timeoutSeconds"]) if "timeoutSeconds" in q else None
        try:
            async with asyncio.timeout(timeout):
                while (change := await watcher.queue.get()) is not None:
                    visible = self._visible(change, namespace, selector)
                    if visible is not None and (visible[0] != "BOOKMARK" or watcher.bookmarks):
                        await send(*visible)
        except TimeoutError:
            pass  # timeoutSeconds elapsed: the server ends the watch normally
        except ConnectionResetError:
            return resp  # the client went away
        finally:
            self._watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):  # the client may already be gone
            await resp.write_eof()
        return resp


def make_pool(
    name: str,
    match_labels: dict[str, str],
    ports: list[int],
    *,
    namespace: str = "default",
) -> dict[str, Any]:
    """An `inference.networking.k8s.io/v1` InferencePool as GAIE's CRD defines it."""
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-pool-{name}"},
        "spec": {
            "selector": {"matchLabels": dict(match_labels)},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {
                "kind": "Service",
                "name": "kvroute-epp",
                "port": {"number": 9002},
                "failureMode": "FailClose",
            },
        },
    }


@pytest.fixture
def pod_object() -> Callable[..., dict[str, Any]]:
    """Factory for pod objects as the API serves them (see `make_pod`)."""
    return make_pod


@pytest.fixture
async def fake_kube() -> AsyncIterator[FakeKubeApi]:
    api = FakeKubeApi()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()
