"""Kubernetes discovery against the fake API server in conftest.py (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from router.discovery.kubernetes import (
    KubernetesDiscovery,
    KubernetesDiscoverySettings,
    PodObjectError,
    pod_from_object,
    pod_is_ready,
)
from router.pods import PodRegistry, Role

SELECTOR = "app=vllm,pool in (llama)"
POOL = {"app": "vllm", "pool": "llama"}


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def settings_for(url: str, **overrides: Any) -> KubernetesDiscoverySettings:
    base = KubernetesDiscoverySettings(
        namespace="inference",
        label_selector=SELECTOR,
        target_port=8000,
        api_server=url,
        backoff_initial_s=0.02,
        backoff_max_s=0.1,
        watch_timeout_s=30,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def running(fake_kube) -> AsyncIterator[tuple[Any, PodRegistry, KubernetesDiscovery]]:
    registry = PodRegistry()
    disc = KubernetesDiscovery(registry, settings_for(fake_kube.url))
    yield fake_kube, registry, disc
    await disc.stop()


def endpoints(registry: PodRegistry) -> set[str]:
    return {p.endpoint for p in registry}


# --- pure mapping ---------------------------------------------------------------------------


def test_pod_is_ready_requires_running_ip_ready_condition_and_no_deletion(pod_object) -> None:
    assert pod_is_ready(pod_object("a", "10.0.0.1"))
    assert not pod_is_ready(pod_object("a", "10.0.0.1", ready=False))
    assert not pod_is_ready(pod_object("a", None))
    assert not pod_is_ready(pod_object("a", "10.0.0.1", phase="Pending"))
    terminating = pod_object("a", "10.0.0.1")
    terminating["metadata"]["deletionTimestamp"] = "2026-11-25T08:00:00Z"
    assert not pod_is_ready(terminating)
    assert not pod_is_ready({"metadata": {}, "status": {"phase": "Running", "podIP": "1.2.3.4"}})


def test_pod_from_object_maps_ip_port_role_labels_and_kv_ports(pod_object) -> None:
    settings = KubernetesDiscoverySettings(
        target_port=8200, kv_events_port=5557, kv_replay_port=5558
    )
    pod = pod_from_object(
        pod_object("p", "10.1.2.3", {"llm-d.ai/role": "prefill", "x": "y"}), settings
    )
    assert pod is not None
    assert pod.endpoint == "10.1.2.3:8200"
    assert pod.role is Role.PREFILL
    assert pod.labels == {"llm-d.ai/role": "prefill", "x": "y"}
    assert pod.kv_events_endpoint == "tcp://10.1.2.3:5557"
    assert pod.kv_replay_endpoint == "tcp://10.1.2.3:5558"
    v6 = pod_from_object(pod_object("q", "fd00::7"), settings)
    assert v6 is not None and v6.endpoint == "[fd00::7]:8200" and v6.role is Role.BOTH
    assert v6.address == ("fd00::7", 8200)


def test_pod_from_object_rejects_unknown_role_value_naming_the_label(pod_object) -> None:
    with pytest.raises(PodObjectError, match=r"llm-d.ai/role='encode'"):
        pod_from_object(
            pod_object("p", "10.0.0.1", {"llm-d.ai/role": "encode"}), KubernetesDiscoverySettings()
        )


def test_settings_reject_bad_port() -> None:
    with pytest.raises(ValueError, match="target_port"):
        KubernetesDiscoverySettings(target_port=70000)


# --- list + watch against the fake API server -----------------------------------------------


async def test_initial_list_registers_only_ready_selected_pods_with_roles(running) -> None:
    fake, registry, disc = running
    fake.add_pod("pre", "10.0.0.1", {**POOL, "llm-d.ai/role": "prefill"}, namespace="inference")
    fake.add_pod("dec", "10.0.0.2", {**POOL, "llm-d.ai/role": "decode"}, namespace="inference")
    fake.add_pod("any", "10.0.0.3", POOL, namespace="inference")
    fake.add_pod("starting", "10.0.0.4", POOL, namespace="inference", ready=False)
    fake.add_pod("pending", None, POOL, namespace="inference", phase="Pending")
    fake.add_pod("other-pool", "10.0.0.5", {"app": "vllm", "pool": "qwen"}, namespace="inference")
    fake.add_pod("other-ns", "10.0.0.6", POOL, namespace="default")
    await disc.start()
    await asyncio.wait_for(disc.synced.wait(), 5)
    assert endpoints(registry) == {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
    assert registry["10.0.0.1:8000"].role is Role.PREFILL
    assert registry["10.0.0.2:8000"].role is Role.DECODE
    assert registry["10.0.0.3:8000"].role is Role.BOTH
    first = fake.requests[0]
    assert first["namespace"] == "inference" and first["labelSelector"] == SELECTOR
    assert "watch" not in first


async def test_watch_adds_removes_on_not_ready_and_readds_on_ready(running) -> None:
    fake, registry, disc = running
    removed: list[str] = []
    registry.on_remove(removed.append)
    await disc.start()
    await asyncio.wait_for(disc.synced.wait(), 5)
    assert len(registry) == 0

    fake.add_pod("a", "10.0.0.1", POOL, namespace="inference")
    fake.add_pod("b", "10.0.0.2", POOL, namespace="inference", ready=False)
    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8000"})

    fake.set_ready("b", True, namespace="inference")
    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8000", "10.0.0.2:8000"})

    fake.set_ready("a", False, namespace="inference")
    await eventually(lambda: endpoints(registry) == {"10.0.0.2:8000"})
    assert removed == ["10.0.0.1:8000"]

    fake.set_ready("a", True, namespace="inference")
    await eventually(lambda: "10.0.0.1:8000" in registry)

    fake.delete_pod("b", namespace="inference")
    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8000"})
    assert removed == ["10.0.0.1:8000", "10.0.0.2:8000"]
    watches = fake.watch_requests()
    assert watches and watches[0]["allowWatchBookmarks"] in ("true", "True")
    assert disc.stats.lists == 1


async def test_role_relabel_updates_pod_and_keeps_inflight_state(running) -> None:
    fake, registry, disc = running
    fake.add_pod("a", "10.0.0.1", POOL, namespace="inference")
    await disc.start()
    await asyncio.wait_for(disc.synced.wait(), 5)
    pod = registry["10.0.0.1:8000"]
    pod.inflight_requests = 4
    removed: list[str] = []
    registry.on_remove(removed.append)

    fake.set_labels("a", {**POOL, "llm-d.ai/role": "decode"}, namespace="inference")
    await eventually(lambda: registry["10.0.0.1:8000"].role is Role.DECODE)
    assert registry["10.0.0.1:8000"] is pod
    assert pod.inflight_requests == 4
    assert removed == []


async def test_label_change_out_of_selector_removes_pod(running) -> None:
    fake, registry, disc = running
    fake.add_pod("a", "10.0.0.1", POOL, namespace="inference")
    await disc.start()
    await asyncio.wait_for(disc.synced.wait(), 5)
    fake.set_labels("a", {"app": "vllm", "pool": "qwen"}, namespace="inference")
    await eventually(lambda: len(registry) == 0)


async def test_unknown_role_label_skips_pod_without_stopping_discovery(running) -> None:
    fake, registry, disc = running
    fake.add_pod("bad", "10.0.0.9", {**POOL, "llm-d.ai/role": "encode"}, namespace="inference")
    await disc.start()
    await asyncio.wait_for(disc.synced.wait(), 5)
    fake.add_pod("good", "10.0.0.1", POOL, namespace="inference")
    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8000"})
    assert disc.stats.rejected_pods == 1
    fake.set_labels("bad", {**POOL, "llm-d.ai/role": "prefill"}, namespace="inference")
    await eventually(lambda: "10.0.0.9:8000" in registry)


async def test_relists_after_410_gone_and_reflects_missed_changes(running) -> None:
    fake, registry, disc = running
    fake.add_pod("stay", "10.0.0.1", POOL, namespace="inference")
    fake.add_pod("leave", "10.0.0.2", POOL, namespace="inference")
    await disc.start()
    await asyncio.wait_for(disc.synced.wait(), 5)
    await eventually(lambda: fake.watch_requests())
    registry["10.0.0.1:8000"].inflight_requests = 2
    removed: list[str] = []
    registry.on_remove(removed.append)

    with fake.lose_events():
        fake.delete_pod("leave", namespace="inference")
        fake.add_pod("new", "10.0.0.3", POOL, namespace="inference")

    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8000", "10.0.0.3:8000"})
    assert disc.stats.expired == 1
    assert disc.stats.lists == 2
    assert removed == ["10.0.0.2:8000"]
    assert registry["10.0.0.1:8000"].inflight_requests == 2
    # The watch after the relist starts from the new list's version and sees live events.
    fake.delete_pod("new", namespace="inference")
    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8000"})


async def test_dropped_watch_resumes_from_last_version_without_relisting(running) -> None:
    fake, registry, disc = running
    await disc.start()
    await asyncio.wait_for(disc.synced.wait(), 5)
    fake.add_pod("a", "10.0.0.1", POOL, namespace="inference")
    await eventually(lambda: len(registry) == 1)
    rv_bookmark = fake.bookmark()
    await eventually(lambda: disc.stats.bookmarks == 1)
    fake.drop_watches()
    fake.add_pod("b", "10.0.0.2", POOL, namespace="inference")
    await eventually(lambda: len(registry) == 2)
    watches = fake.watch_requests()
    assert len(watches) >= 2
    assert watches[1]["resourceVersion"] == str(rv_bookmark)
    assert disc.stats.lists == 1


async def test_server_side_watch_timeout_resumes_watch(fake_kube) -> None:
    registry = PodRegistry()
    disc = KubernetesDiscovery(registry, settings_for(fake_kube.url, watch_timeout_s=1))
    try:
        await disc.start()
        await asyncio.wait_for(disc.synced.wait(), 5)
        await eventually(lambda: len(fake_kube.watch_requests()) >= 2, 4)
        fake_kube.add_pod("a", "10.0.0.1", POOL, namespace="inference")
        await eventually(lambda: len(registry) == 1)
        assert disc.stats.lists == 1
        assert fake_kube.watch_requests()[0]["timeoutSeconds"] == "1"
    finally:
        await disc.stop()


async def test_api_errors_back_off_and_recover(fake_kube) -> None:
    fake_kube.fail_next = 3
    fake_kube.add_pod("a", "10.0.0.1", POOL, namespace="inference")
    registry = PodRegistry()
    disc = KubernetesDiscovery(registry, settings_for(fake_kube.url))
    try:
        await disc.start()
        await asyncio.wait_for(disc.synced.wait(), 5)
        assert endpoints(registry) == {"10.0.0.1:8000"}
        assert disc.stats.errors == 3
    finally:
        await disc.stop()


async def test_bearer_token_is_sent_and_wrong_token_never_syncs(fake_kube) -> None:
    fake_kube.token = "s3cret"
    fake_kube.add_pod("a", "10.0.0.1", POOL, namespace="inference")
    wrong = KubernetesDiscovery(PodRegistry(), settings_for(fake_kube.url, token="nope"))
    right_registry = PodRegistry()
    right = KubernetesDiscovery(right_registry, settings_for(fake_kube.url, token="s3cret"))
    try:
        await wrong.start()
        await right.start()
        await asyncio.wait_for(right.synced.wait(), 5)
        assert endpoints(right_registry) == {"10.0.0.1:8000"}
        await eventually(lambda: wrong.stats.errors >= 2)
        assert not wrong.synced.is_set()
    finally:
        await wrong.stop()
        await right.stop()


async def test_kubeconfig_file_supplies_server_and_token(fake_kube, tmp_path) -> None:
    fake_kube.token = "from-kubeconfig"
    fake_kube.add_pod("a", "10.0.0.1", POOL, namespace="inference")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""\
apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster: {{server: "{fake_kube.url}"}}
users:
  - name: router
    user: {{token: from-kubeconfig}}
contexts:
  - name: fake
    context: {{cluster: fake, user: router}}
current-context: fake
"""
    )
    registry = PodRegistry()
    disc = KubernetesDiscovery(
        registry, settings_for(fake_kube.url, api_server=None, kubeconfig=str(kubeconfig))
    )
    try:
        await disc.start()
        await asyncio.wait_for(disc.synced.wait(), 5)
        assert endpoints(registry) == {"10.0.0.1:8000"}
    finally:
        await disc.stop()
