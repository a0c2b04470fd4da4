"""Static discovery: the `pods:` list parser and the reloading file watcher."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.discovery.pod_list import PodListError, pods_from_yaml_list
from router.discovery.static import (
    StaticDiscovery,
    StaticDiscoverySettings,
    read_pods_file,
)
from router.pods import PodRegistry, Role

FLEET_AB = """\
server: {port: 8080}          # other sections of the main config are ignored
pods:
  - endpoint: "10.0.0.1:8000"
    role: prefill
    labels: {zone: a}
    models: [llama]
    adapters: [sql-lora]
    kv_events_endpoint: tcp://10.0.0.1:5557
    kv_replay_endpoint: tcp://10.0.0.1:5558
  - endpoint: "10.0.0.2:8000"
    role: decode
"""

FLEET_AC = """\
pods:
  - endpoint: "10.0.0.1:8000"
    role: prefill
    labels: {zone: b}
  - endpoint: "10.0.0.3:8000"
"""


async def eventually(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def rewrite(path: Path, text: str) -> None:
    """Write and bump mtime explicitly, so coarse filesystem timestamps still show a change."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000))


@pytest.fixture
def pods_file(tmp_path: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(FLEET_AB)
    return path


# --- pods_from_yaml_list --------------------------------------------------------------------


def test_pod_list_parses_every_field() -> None:
    pods = pods_from_yaml_list(yaml.safe_load(FLEET_AB)["pods"], "test.yaml")
    a, b = pods
    assert a.endpoint == "10.0.0.1:8000" and a.role is Role.PREFILL
    assert a.labels == {"zone": "a"}
    assert a.models == frozenset({"llama"}) and a.adapters == frozenset({"sql-lora"})
    assert a.kv_events_endpoint == "tcp://10.0.0.1:5557"
    assert a.kv_replay_endpoint == "tcp://10.0.0.1:5558"
    assert b.role is Role.DECODE and b.labels == {} and b.models == frozenset()
    assert b.kv_events_endpoint is None


def test_pod_list_accepts_ipv6_hosts_and_empty_list() -> None:
    pods = pods_from_yaml_list([{"endpoint": "[fd00::1]:8000"}], "x")
    assert pods[0].address == ("fd00::1", 8000)
    assert pods_from_yaml_list([], "x") == []
    assert pods_from_yaml_list(None, "x") == []


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ({"endpoint": "a:1"}, r"f\.yaml: pods: expected a list"),
        (["a:1"], r"pods\[0\]: expected a mapping"),
        ([{"role": "both"}], r"pods\[0\]\.endpoint: missing"),
        ([{"endpoint": "10.0.0.1"}], r"pods\[0\]\.endpoint: '10\.0\.0\.1' is not 'host:port'"),
        ([{"endpoint": "h:99999"}], r"pods\[0\]\.endpoint: 'h:99999': port must be"),
        ([{"endpoint": "h:http"}], r"pods\[0\]\.endpoint: 'h:http': port must be"),
        ([{"endpoint": 8000}], r"pods\[0\]\.endpoint: expected 'host:port' string"),
        ([{"endpoint": "fd00::1:80"}], r"write IPv6 hosts as \[addr\]:port"),
        (
            [{"endpoint": "h:1"}, {"endpoint": "h:2", "role": "prefil"}],
            r"pods\[1\]\.role: 'prefil' is not one of both, prefill, decode",
        ),
        ([{"endpoint": "h:1", "rol": "decode"}], r"pods\[0\]: unknown field 'rol'"),
        ([{"endpoint": "h:1", "labels": {"gpu": 80}}], r"pods\[0\]\.labels\.gpu: .*strings"),
        ([{"endpoint": "h:1", "labels": ["a"]}], r"pods\[0\]\.labels: expected a mapping"),
        ([{"endpoint": "h:1", "models": "llama"}], r"pods\[0\]\.models: expected a list"),
        (
            [{"endpoint": "h:1", "adapters": [""]}],
            r"pods\[0\]\.adapters\[0\]: expected a non-empty",
        ),
        (
            [{"endpoint": "h:1", "kv_events_endpoint": "10.0.0.1:5557"}],
            r"pods\[0\]\.kv_events_endpoint: expected a ZMQ address",
        ),
        (
            [{"endpoint": "h:1"}, {"endpoint": "h:1"}],
            r"pods\[1\]\.endpoint: 'h:1' already listed at pods\[0\]",
        ),
    ],
)
def test_pod_list_errors_name_the_bad_field(items: Any, message: str) -> None:
    with pytest.raises(PodListError, match=message):
        pods_from_yaml_list(items, "f.yaml")


def test_read_pods_file_requires_a_pods_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 1}\n")
    with pytest.raises(PodListError, match="top-level 'pods:'"):
        read_pods_file(path)
    path.write_text("pods: [\n")
    with pytest.raises(PodListError, match="invalid YAML"):
        read_pods_file(path)
    with pytest.raises(PodListError, match="cannot read"):
        read_pods_file(tmp_path / "missing.yaml")


# --- reloading ------------------------------------------------------------------------------


def test_reload_keeps_inflight_state_of_staying_pods_and_removes_the_rest(pods_file: Path) -> None:
    registry = PodRegistry()
    removed: list[str] = []
    registry.on_remove(removed.append)
    disc = StaticDiscovery(registry, StaticDiscoverySettings(path=str(pods_file)))
    disc.load()
    staying = registry["10.0.0.1:8000"]
    staying.inflight_requests = 3
    staying.inflight_prefill_tokens = 900

    rewrite(pods_file, FLEET_AC)
    assert disc.check_for_change()
    assert {p.endpoint for p in registry} == {"10.0.0.1:8000", "10.0.0.3:8000"}
    assert registry["10.0.0.1:8000"] is staying
    assert staying.inflight_requests == 3 and staying.inflight_prefill_tokens == 900
    assert staying.labels == {"zone": "b"}
    assert removed == ["10.0.0.2:8000"]
    assert not disc.check_for_change()  # unchanged file: nothing to do
    assert disc.stats.reloads == 2


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("pods:\n  - endpoint: '10.0.0.9:8000'\n    role: prefil\n", "pods[0].role"),
        ("pods: [\n", "invalid YAML"),
        ("", "top-level 'pods:'"),
    ],
    ids=["bad-role", "bad-yaml", "truncated"],
)
def test_bad_reload_keeps_the_old_fleet_and_counts_once(
    pods_file: Path, text: str, error: str
) -> None:
    registry = PodRegistry()
    removed: list[str] = []
    registry.on_remove(removed.append)
    disc = StaticDiscovery(registry, StaticDiscoverySettings(path=str(pods_file)))
    disc.load()

    rewrite(pods_file, text)
    assert not disc.check_for_change()
    assert {p.endpoint for p in registry} == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert removed == []
    assert disc.stats.reload_failures == 1
    assert disc.stats.last_error is not None and error in disc.stats.last_error
    assert not disc.check_for_change()  # the same bad file is not retried every poll
    assert disc.stats.reload_failures == 1

    rewrite(pods_file, FLEET_AC)
    assert disc.check_for_change()
    assert disc.stats.last_error is None
    assert removed == ["10.0.0.2:8000"]


def test_deleted_file_keeps_the_old_fleet(pods_file: Path) -> None:
    registry = PodRegistry()
    disc = StaticDiscovery(registry, StaticDiscoverySettings(path=str(pods_file)))
    disc.load()
    pods_file.unlink()
    assert not disc.check_for_change()
    assert len(registry) == 2 and disc.stats.reload_failures == 1


async def test_start_with_bad_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pods:\n  - endpoint: nope\n")
    disc = StaticDiscovery(PodRegistry(), StaticDiscoverySettings(path=str(path)))
    with pytest.raises(PodListError, match=r"pods\[0\]\.endpoint"):
        await disc.start()
    await disc.stop()


async def test_polling_picks_up_a_changed_file(pods_file: Path) -> None:
    registry = PodRegistry()
    settings = StaticDiscoverySettings(
        path=str(pods_file), poll_interval_s=0.02, reload_on_sighup=False
    )
    disc = StaticDiscovery(registry, settings)
    await disc.start()
    try:
        assert len(registry) == 2
        rewrite(pods_file, FLEET_AC)
        await eventually(lambda: "10.0.0.3:8000" in registry)
        assert "10.0.0.2:8000" not in registry
    finally:
        await disc.stop()


async def test_sighup_reloads_the_file(pods_file: Path) -> None:
    registry = PodRegistry()
    settings = StaticDiscoverySettings(path=str(pods_file), poll_interval_s=0)
    disc = StaticDiscovery(registry, settings)
    await disc.start()
    try:
        rewrite(pods_file, FLEET_AC)
        await asyncio.sleep(0.05)
        assert "10.0.0.3:8000" not in registry  # no polling: only the signal reloads
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: "10.0.0.3:8000" in registry)
    finally:
        await disc.stop()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # stop() uninstalled the handler


def test_settings_require_a_path() -> None:
    with pytest.raises(ValueError, match="path"):
        StaticDiscovery(PodRegistry(), StaticDiscoverySettings())


def test_pod_list_errors_carry_lines_when_the_loader_records_them() -> None:
    class LineDict(dict):
        pass

    entry = LineDict(endpoint="h:1", role="boss")
    entry.lines = {"endpoint": 7, "role": 8}

    def line_of(node: Any, key: Any = None) -> int:
        return getattr(node, "lines", {}).get(key, 0)

    with pytest.raises(PodListError, match=r"^cfg\.yaml:8: pods\[0\]\.role: 'boss'"):
        pods_from_yaml_list([entry], "cfg.yaml", line_of)
