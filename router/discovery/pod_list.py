"""Parsing of a config file's `pods:` list into `Pod` objects (pure, no I/O).

Shared by static discovery (which re-reads the list when the file changes) and the main config
loader. Every error names the source, the entry index and the field, e.g.
`router.yaml: pods[2].role: 'prefil' is not one of both, prefill, decode`.

Entry format::

    - endpoint: "10.0.0.7:8000"      # required, host:port ([v6]:port for IPv6)
      role: both                     # both | prefill | decode
      labels: {zone: a}              # string → string
      models: [llama]                # served model names (empty = any)
      adapters: [sql-lora]           # LoRA adapters it can serve
      kv_events_endpoint: null       # e.g. tcp://10.0.0.7:5557 (pod binds PUB)
      kv_replay_endpoint: null       # e.g. tcp://10.0.0.7:5558 (pod binds ROUTER)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from router.pods import Pod, Role

POD_FIELDS = (
    "endpoint",
    "role",
    "labels",
    "models",
    "adapters",
    "kv_events_endpoint",
    "kv_replay_endpoint",
)
_ZMQ_TRANSPORTS = ("tcp://", "ipc://", "inproc://")


class PodListError(ValueError):
    """A `pods:` list entry is malformed; the message names source, entry and field."""


#: Maps (node, key or None) to the node's 1-based line in the file, 0 when unknown.
LineOf = Callable[[Any, Any], int]


def pods_from_yaml_list(items: Any, source: str, line_of: LineOf | None = None) -> list[Pod]:
    """Build pods from a parsed YAML `pods:` value; raise PodListError naming the bad field.

    With `line_of` (a loader that records lines), messages read `source:LINE: pods[i].field: ...`.
    """
    if items is None:
        return []

    def loc(node: Any, key: Any = None) -> str:
        line = line_of(node, key) if line_of is not None else 0
        return f"{source}:{line}" if line else source

    if not isinstance(items, list):
        raise PodListError(f"{loc(items)}: pods: expected a list, got {type(items).__name__}")
    pods: list[Pod] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        pod = _pod_from_entry(item, i, loc)
        if pod.endpoint in seen:
            raise PodListError(
                f"{loc(item, 'endpoint')}: pods[{i}].endpoint: {pod.endpoint!r} already listed "
                f"at pods[{seen[pod.endpoint]}]"
            )
        seen[pod.endpoint] = i
        pods.append(pod)
    return pods


def check_endpoint(endpoint: Any, where: str) -> str:
    """Return `endpoint` if it is `host:port` with a port in 1..65535, else raise."""
    if not isinstance(endpoint, str):
        raise PodListError(f"{where}: expected 'host:port' string, got {type(endpoint).__name__}")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or host in ("[", "[]"):
        raise PodListError(f"{where}: {endpoint!r} is not 'host:port'")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise PodListError(f"{where}: {endpoint!r}: write IPv6 hosts as [addr]:port")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise PodListError(f"{where}: {endpoint!r}: port must be an integer in 1..65535")
    return endpoint


def _pod_from_entry(item: Any, i: int, loc: Callable[..., str]) -> Pod:
    if not isinstance(item, Mapping):
        raise PodListError(
            f"{loc(item)}: pods[{i}]: expected a mapping with 'endpoint', got {item!r}"
        )

    def where(key: str) -> str:
        return f"{loc(item, key)}: pods[{i}].{key}"

    unknown = [k for k in item if k not in POD_FIELDS]
    if unknown:
        raise PodListError(
            f"{loc(item, unknown[0])}: pods[{i}]: unknown field {str(unknown[0])!r} "
            f"(known: {', '.join(POD_FIELDS)})"
        )
    if "endpoint" not in item:
        raise PodListError(f"{loc(item)}: pods[{i}].endpoint: missing (required, 'host:port')")
    endpoint = check_endpoint(item["endpoint"], where("endpoint"))
    role_value = item.get("role", Role.BOTH.value)
    try:
        role = Role(role_value)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise PodListError(f"{where('role')}: {role_value!r} is not one of {choices}") from None
    return Pod(
        endpoint=endpoint,
        role=role,
        labels=_labels(item.get("labels"), where("labels")),
        models=frozenset(_names(item.get("models"), where("models"))),
        adapters=frozenset(_names(item.get("adapters"), where("adapters"))),
        kv_events_endpoint=_zmq_endpoint(
            item.get("kv_events_endpoint"), where("kv_events_endpoint")
        ),
        kv_replay_endpoint=_zmq_endpoint(
            item.get("kv_replay_endpoint"), where("kv_replay_endpoint")
        ),
    )


def _labels(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PodListError(f"{where}: expected a mapping of strings, got {type(value).__name__}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PodListError(f"{where}.{k}: keys and values must be strings (quote {v!r})")
        out[k] = v
    return out


def _names(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PodListError(f"{where}: expected a list of names, got {type(value).__name__}")
    for j, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise PodListError(f"{where}[{j}]: expected a non-empty string, got {name!r}")
    return value


def _zmq_endpoint(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(_ZMQ_TRANSPORTS):
        raise PodListError(
            f"{where}: expected a ZMQ address like 'tcp://host:port' or null, got {value!r}"
        )
    return value
