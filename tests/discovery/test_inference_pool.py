"""InferencePool-driven discovery against the fake API server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from router.discovery.inference_pool import (
    GROUP,
    PLURAL,
    InferencePoolError,
    pool_target,
)
from router.discovery.kubernetes import KubernetesDiscovery, KubernetesDiscoverySettings
from router.pods import PodRegistry, Role
from tests.discovery.conftest import make_pool, selector_matches

NS = "inference"
RBAC = Path(__file__).resolve().parents[2] / "configs" / "kubernetes" / "rbac.yaml"


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def pool_settings(url: str, name: str = "llama") -> KubernetesDiscoverySettings:
    return KubernetesDiscoverySettings(
        namespace=NS,
        pool_name=name,
        api_server=url,
        backoff_initial_s=0.02,
        backoff_max_s=0.1,
        watch_timeout_s=30,
    )


def endpoints(registry: PodRegistry) -> set[str]:
    return {p.endpoint for p in registry}


@pytest.fixture
async def follow(fake_kube) -> Any:
    started: list[KubernetesDiscovery] = []

    async def start(name: str = "llama") -> tuple[PodRegistry, KubernetesDiscovery]:
        registry = PodRegistry()
        disc = KubernetesDiscovery(registry, pool_settings(fake_kube.url, name))
        started.append(disc)
        await disc.start()
        return registry, disc

    yield start
    for disc in started:
        await disc.stop()


# --- pure mapping ---------------------------------------------------------------------------


def test_pool_target_reads_match_labels_expressions_and_every_port() -> None:
    pool = make_pool("llama", {"app": "vllm", "tier": "gpu"}, [8000, 8001, 8002], namespace=NS)
    pool["spec"]["selector"]["matchExpressions"] = [
        {"key": "zone", "operator": "In", "values": ["a", "b"]},
        {"key": "draining", "operator": "DoesNotExist"},
    ]
    target = pool_target(pool)
    assert target.target_ports == (8000, 8001, 8002)
    sel = target.label_selector
    assert selector_matches(sel, {"app": "vllm", "tier": "gpu", "zone": "a"})
    assert not selector_matches(sel, {"app": "vllm", "tier": "gpu", "zone": "c"})
    assert not selector_matches(sel, {"app": "vllm", "tier": "gpu", "zone": "a", "draining": "y"})
    assert not selector_matches(sel, {"app": "vllm", "zone": "a"})


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.pop("selector"), "spec.selector is missing"),
        (lambda s: s.update(selector={"matchLabels": {}}), "selects nothing"),
        (lambda s: s.update(targetPorts=[]), "spec.targetPorts must list 1 to 8"),
        (lambda s: s.update(targetPorts=[{"number": 8000 + i} for i in range(9)]), "at most 8"),
        (lambda s: s.update(targetPorts=[{"number": 0}]), "targetPorts[0].number"),
        (lambda s: s.update(targetPorts=[{"number": 80}, {"number": 80}]), "repeated"),
        (
            lambda s: s["selector"].update(matchExpressions=[{"key": "a", "operator": "Gt"}]),
            "not one of In, NotIn, Exists, DoesNotExist",
        ),
    ],
)
def test_pool_target_rejects_bad_specs_naming_pool_and_field(edit, words: str) -> None:
    pool = make_pool("llama", {"app": "vllm"}, [8000], namespace=NS)
    edit(pool["spec"])
    with pytest.raises(InferencePoolError) as info:
        pool_target(pool)
    assert f"InferencePool {NS}/llama" in str(info.value)
    assert words in str(info.value)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9.-]{0,10}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(1, 65535), min_size=1, max_size=8, unique=True),
)
def test_pool_target_selector_selects_exactly_the_match_labels(labels, ports) -> None:
    target = pool_target(make_pool("p", labels, ports))
    assert target.target_ports == tuple(ports)
    assert selector_matches(target.label_selector, {**labels, "extra": "x"})
    for key in labels:
        assert not selector_matches(
            target.label_selector, {k: v for k, v in labels.items() if k != key}
        )


# --- against the API server -----------------------------------------------------------------


async def test_pool_read_gives_every_ready_pod_at_every_target_port(fake_kube, follow) -> None:
    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8000, 8001], namespace=NS))
    fake_kube.add_pod("a", "10.0.0.1", {"app": "vllm"}, namespace=NS)
    fake_kube.add_pod("b", "10.0.0.2", {"app": "vllm", "llm-d.ai/role": "decode"}, namespace=NS)
    fake_kube.add_pod("c", "10.0.0.3", {"app": "other"}, namespace=NS)
    fake_kube.add_pod("d", "10.0.0.4", {"app": "vllm"}, namespace=NS, ready=False)
    registry, disc = await follow()
    await asyncio.wait_for(disc.synced.wait(), 5)
    assert endpoints(registry) == {
        "10.0.0.1:8000",
        "10.0.0.1:8001",
        "10.0.0.2:8000",
        "10.0.0.2:8001",
    }
    assert registry.get("10.0.0.2:8001").role is Role.DECODE
    assert disc.settings.label_selector == "app=vllm"
    # The pod list asked the API for the pool's selector, not for the whole namespace.
    assert fake_kube.list_requests()[-1]["labelSelector"] == "app=vllm"
    assert fake_kube.pool_requests[0]["fieldSelector"] == "metadata.name=llama"
    # A pod event after the pool was read still fans out to every port.
    fake_kube.add_pod("e", "10.0.0.5", {"app": "vllm"}, namespace=NS)
    await eventually(lambda: {"10.0.0.5:8000", "10.0.0.5:8001"} <= endpoints(registry))


async def test_pool_edit_moves_the_fleet_to_the_new_selector_and_ports(fake_kube, follow) -> None:
    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8000], namespace=NS))
    fake_kube.add_pod("a", "10.0.0.1", {"app": "vllm"}, namespace=NS)
    fake_kube.add_pod("b", "10.0.0.2", {"app": "vllm-next"}, namespace=NS)
    registry, disc = await follow()
    await asyncio.wait_for(disc.synced.wait(), 5)
    assert endpoints(registry) == {"10.0.0.1:8000"}

    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8000, 9000], namespace=NS))
    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8000", "10.0.0.1:9000"})

    fake_kube.put_pool(make_pool("llama", {"app": "vllm-next"}, [9000], namespace=NS))
    await eventually(lambda: endpoints(registry) == {"10.0.0.2:9000"})
    # Pod events now follow the new selector: the old pod's changes no longer matter.
    fake_kube.add_pod("c", "10.0.0.3", {"app": "vllm-next"}, namespace=NS)
    fake_kube.add_pod("d", "10.0.0.4", {"app": "vllm"}, namespace=NS)
    await eventually(lambda: endpoints(registry) == {"10.0.0.2:9000", "10.0.0.3:9000"})
    assert disc._pool.stats.retargets == 3


async def test_bad_pool_edit_keeps_the_last_good_fleet(fake_kube, follow) -> None:
    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8000], namespace=NS))
    fake_kube.add_pod("a", "10.0.0.1", {"app": "vllm"}, namespace=NS)
    registry, disc = await follow()
    await asyncio.wait_for(disc.synced.wait(), 5)
    bad = make_pool("llama", {"app": "vllm"}, [8000], namespace=NS)
    bad["spec"]["targetPorts"] = []
    fake_kube.put_pool(bad)
    await eventually(lambda: disc._pool.error is not None)
    assert "spec.targetPorts must list 1 to 8 ports" in disc._pool.error
    assert endpoints(registry) == {"10.0.0.1:8000"}


async def test_missing_pool_is_reported_and_retried_until_created(fake_kube, follow) -> None:
    fake_kube.add_pod("a", "10.0.0.1", {"app": "vllm"}, namespace=NS)
    registry, disc = await follow()
    await eventually(lambda: disc._pool.error is not None)
    assert disc._pool.error.startswith(f"InferencePool {NS}/llama not found")
    assert f"kubectl get {PLURAL}.{GROUP} -n {NS}" in disc._pool.error
    await eventually(lambda: disc._pool.stats.lists >= 3)  # retried
    assert not disc.synced.is_set() and len(registry) == 0
    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8000], namespace=NS))
    await asyncio.wait_for(disc.synced.wait(), 5)
    assert endpoints(registry) == {"10.0.0.1:8000"}
    assert disc._pool.error is None


async def test_cluster_without_the_crd_says_to_install_it(fake_kube, follow) -> None:
    fake_kube.crd_installed = False
    _, disc = await follow()
    await eventually(lambda: disc._pool.error is not None)
    assert "install GAIE's CRDs" in disc._pool.error
    assert "--pool-selector" in disc._pool.error
    fake_kube.crd_installed = True
    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8000], namespace=NS))
    await asyncio.wait_for(disc.synced.wait(), 5)


async def test_deleted_pool_keeps_the_fleet_and_a_recreated_one_is_followed(
    fake_kube, follow
) -> None:
    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8000], namespace=NS))
    fake_kube.add_pod("a", "10.0.0.1", {"app": "vllm"}, namespace=NS)
    registry, disc = await follow()
    await asyncio.wait_for(disc.synced.wait(), 5)
    fake_kube.delete_pool("llama", namespace=NS)
    await eventually(lambda: disc._pool.error is not None and "deleted" in disc._pool.error)
    assert endpoints(registry) == {"10.0.0.1:8000"}
    fake_kube.put_pool(make_pool("llama", {"app": "vllm"}, [8100], namespace=NS))
    await eventually(lambda: endpoints(registry) == {"10.0.0.1:8100"})


def test_rbac_grants_exactly_what_pool_discovery_reads() -> None:
    """The code lists+watches pods (core) and inferencepools (GAIE v1); the Role allows it."""
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    role = next(d for d in docs if d["kind"] == "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for group, resource in (("", "pods"), (GROUP, PLURAL)):
        for verb in ("list", "watch"):
            assert (group, resource, verb) in granted
    # Nothing beyond reads.
    assert {verb for _, _, verb in granted} <= {"get", "list", "watch"}


# --- kvroute serve's flags ------------------------------------------------------------------


def _serve_args(*argv: str) -> Any:
    import argparse

    from envoy_extproc import cli

    parser = argparse.ArgumentParser(prog="kvroute")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", "--config", "router.yaml", *argv])


def test_serve_pool_name_flags_follow_the_pool_and_the_old_flags_still_work() -> None:
    from envoy_extproc.cli import kubernetes_from_args

    by_pool = kubernetes_from_args(_serve_args("--pool-name", "llama", "--pool-namespace", NS))
    assert (by_pool.pool_name, by_pool.namespace) == ("llama", NS)
    by_selector = kubernetes_from_args(
        _serve_args("--pool-selector", "app=vllm", "--pool-target-port", "8200")
    )
    assert by_selector.pool_name is None
    assert (by_selector.label_selector, by_selector.target_port) == ("app=vllm", 8200)
    assert kubernetes_from_args(_serve_args()) is None
    with pytest.raises(ValueError, match="--pool-name reads the selector and ports"):
        kubernetes_from_args(_serve_args("--pool-name", "llama", "--pool-selector", "app=x"))
    with pytest.raises(ValueError, match="--pool-target-port needs --pool-selector"):
        kubernetes_from_args(_serve_args("--pool-target-port", "8000"))
