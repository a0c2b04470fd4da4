"""The deployment files (Kubernetes, Istio, Envoy, Dockerfile, Grafana) agree with the code.

Each YAML is loaded, the picker's container arguments are parsed by the real `kvroute` CLI
parser, and names, ports, probes and metric names are checked against the constants the
server uses. Envoy bootstraps are also checked by `envoy --mode validate` when envoy exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from envoy_extproc import cli as serve_cli
from envoy_extproc.envoy_process import BOOTSTRAPS, envoy_binary, render_bootstrap
from envoy_extproc.messages import DESTINATION_HEADER
from envoy_extproc.metrics import PickerMetrics
from envoy_extproc.server import EXT_PROC_SERVICE, HEALTH_SERVICES
from envoy_extproc.settings import GRPC_PORT, HEALTH_PORT, METRICS_PORT
from router.config import parse_config
from router.discovery.static import StaticDiscoveryStats
from router.events.ingest import EventStats
from router.pods import PodRegistry
from router.scrape import ScrapeStats

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def build_parser() -> argparse.ArgumentParser:
    """`kvroute` with just the `serve` subcommand (the one these files run)."""
    parser = argparse.ArgumentParser(prog="kvroute")
    serve_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(directory: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((CONFIGS / directory).glob("*.yaml")):
        for d in docs(path):
            out.setdefault(d["kind"], []).append(d)
    return out


K8S = by_kind("kubernetes")
ISTIO = by_kind("istio")


def one(kinds: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (doc,) = kinds[kind]
    return doc


def picker_args() -> Any:
    container = one(K8S, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return build_parser().parse_args(container["args"]), container


@pytest.mark.parametrize("directory", ["kubernetes", "istio"])
def test_every_manifest_has_kind_version_and_name(directory: str) -> None:
    for path in (CONFIGS / directory).glob("*.yaml"):
        for d in docs(path):
            assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], path


def test_deployment_args_parse_with_the_cli_and_ports_match_the_code() -> None:
    args, container = picker_args()
    assert args.command == "serve"
    assert (args.grpc_port, args.health_port, args.metrics_port) == (
        GRPC_PORT,
        HEALTH_PORT,
        METRICS_PORT,
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "grpc-health": HEALTH_PORT, "metrics": METRICS_PORT}
    ready, live = container["readinessProbe"]["grpc"], container["livenessProbe"]["grpc"]
    assert ready == {"port": HEALTH_PORT, "service": "readiness"}
    assert live == {"port": HEALTH_PORT, "service": "liveness"}
    assert {"readiness", "liveness"} <= set(HEALTH_SERVICES)
    spec = one(K8S, "Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > args.grace_period


def test_shutdown_budget_fits_the_termination_grace_and_the_longest_route() -> None:
    """preStop sleep + lame duck + drain grace < terminationGracePeriodSeconds, and the drain
    lasts as long as the routes let a request run, so no stream Envoy allows is cut."""
    args, container = picker_args()
    spec = one(K8S, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0 and args.lame_duck > 0
    assert pre_stop + args.lame_duck + args.grace_period < spec["terminationGracePeriodSeconds"]
    boot = yaml.safe_load(
        render_bootstrap("FULL_DUPLEX_STREAMED", listen_port=1, admin_port=2, picker_port=3)
    )
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    longest = max(_seconds(r["route"]["timeout"]) for r in routes if "route" in r)
    assert args.grace_period >= longest
    ready = container["readinessProbe"]
    assert args.lame_duck >= ready["periodSeconds"] * ready["failureThreshold"]


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def test_config_map_is_a_valid_router_config_at_the_path_serve_reads() -> None:
    args, container = picker_args()
    spec = one(K8S, "Deployment")["spec"]["template"]["spec"]
    cm = one(K8S, "ConfigMap")
    (volume,) = spec["volumes"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    key = Path(str(args.config)).relative_to(mount["mountPath"]).as_posix()
    config = parse_config(cm["data"][key])
    assert config.profiles


def test_service_selects_the_picker_and_exposes_its_three_ports() -> None:
    svc = one(K8S, "Service")
    labels = one(K8S, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sorted(p["targetPort"] for p in svc["spec"]["ports"]) == sorted(
        [GRPC_PORT, HEALTH_PORT, METRICS_PORT]
    )
    assert all(p["port"] == p["targetPort"] for p in svc["spec"]["ports"])


def test_rbac_lets_the_service_account_watch_pods_and_inference_pools() -> None:
    sa = one(K8S, "ServiceAccount")["metadata"]["name"]
    assert one(K8S, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa
    role = one(K8S, "Role")
    binding = one(K8S, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    granted = {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    for res in ("pods", "inferencepools"):
        assert {(res, "list"), (res, "watch")} <= granted


def test_inference_pool_points_at_the_picker_service_and_the_discovered_pods() -> None:
    args, _ = picker_args()
    pool = one(ISTIO, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == one(K8S, "Service")["metadata"]["name"]
    assert ref["port"]["number"] == GRPC_PORT
    key, value = args.pool_selector.split("=")
    assert pool["spec"]["selector"]["matchLabels"] == {key: value}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [args.pool_target_port]
    route = one(ISTIO, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])
    rule = one(ISTIO, "DestinationRule")
    assert rule["spec"]["host"] == ref["name"]


def test_envoy_filter_matches_the_shipped_full_duplex_bootstrap() -> None:
    ef = one(ISTIO, "EnvoyFilter")
    patches = {p["applyTo"]: p["patch"]["value"] for p in ef["spec"]["configPatches"]}
    ext_proc = patches["HTTP_FILTER"]["typed_config"]
    service = one(K8S, "Service")["metadata"]["name"]
    assert f"|{GRPC_PORT}||{service}." in ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
    boot = yaml.safe_load(
        render_bootstrap("FULL_DUPLEX_STREAMED", listen_port=1, admin_port=2, picker_port=3)
    )
    shipped = _ext_proc(boot)
    for key in ("processing_mode", "failure_mode_allow", "status_on_error", "message_timeout"):
        assert ext_proc[key] == shipped[key], key
    (hcm_patch,) = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "NETWORK_FILTER"]
    mappers = hcm_patch["patch"]["value"]["typed_config"]["local_reply_config"]["mappers"]
    boot_hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert mappers[0] == boot_hcm["typed_config"]["local_reply_config"]["mappers"][0]
    cluster = patches["CLUSTER"]
    assert cluster["original_dst_lb_config"]["http_header_name"] == DESTINATION_HEADER
    assert patches["HTTP_ROUTE"]["route"]["cluster"] == cluster["name"]


def _ext_proc(boot: dict[str, Any]) -> dict[str, Any]:
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (f,) = [f for f in hcm["typed_config"]["http_filters"] if "ext_proc" in f["name"]]
    return f["typed_config"]


@pytest.mark.parametrize("mode", sorted(BOOTSTRAPS))
def test_envoy_bootstrap_routes_by_the_destination_header_in_its_body_mode(mode: str) -> None:
    boot = yaml.safe_load(
        render_bootstrap(mode, listen_port=10000, admin_port=10001, picker_port=GRPC_PORT)
    )
    ext_proc = _ext_proc(boot)
    assert ext_proc["processing_mode"]["request_body_mode"] == mode
    # Picker down: refuse at once with a 503 (never pass the request on unrouted); a routing
    # answer may wait for a long body, so well above Envoy's 200 ms default.
    assert ext_proc["failure_mode_allow"] is False
    assert ext_proc["status_on_error"] == {"code": 503}
    assert _seconds(ext_proc["message_timeout"]) >= 60
    # Response bodies go through the picker only in full-duplex mode (usage, TTFT); the others
    # keep the picker out of the response so its death cannot cut a stream.
    response_mode = ext_proc["processing_mode"]["response_body_mode"]
    assert response_mode == ("FULL_DUPLEX_STREAMED" if mode == "FULL_DUPLEX_STREAMED" else "NONE")
    assert ext_proc.get("send_body_without_waiting_for_header_response", False) == (
        mode == "STREAMED"
    )
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    pool = clusters["inference_pool"]
    assert pool["type"] == "ORIGINAL_DST"
    assert pool["original_dst_lb_config"]["http_header_name"] == DESTINATION_HEADER
    picker = clusters[ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]]
    opts = picker["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(opts.values()))["explicit_http_config"]
    port = picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert port["socket_address"]["port_value"] == GRPC_PORT
    (check,) = picker["health_checks"]
    assert check["grpc_health_check"]["service_name"] == EXT_PROC_SERVICE
    assert EXT_PROC_SERVICE in HEALTH_SERVICES


@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")
@pytest.mark.parametrize("mode", sorted(BOOTSTRAPS))
def test_envoy_accepts_the_bootstrap(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_bootstrap(mode, listen_port=10000, admin_port=10001, picker_port=9002))
    binary = envoy_binary()
    assert binary is not None
    done = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path)], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_dockerfile_exposes_the_ports_and_runs_serve() -> None:
    text = (ROOT / "Dockerfile").read_text()
    (expose,) = re.findall(r"^EXPOSE (.+)$", text, re.M)
    assert sorted(int(p) for p in expose.split()) == sorted([GRPC_PORT, HEALTH_PORT, METRICS_PORT])
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["kvroute"]
    assert "kvroute" in (ROOT / "pyproject.toml").read_text()
    args = build_parser().parse_args(cmd)
    assert args.command == "serve"
    _, container = picker_args()
    mount = container["volumeMounts"][0]["mountPath"]
    assert str(args.config).startswith(mount)


def test_grafana_dashboard_queries_only_metrics_the_picker_exports() -> None:
    dash = json.loads((CONFIGS / "grafana" / "kvroute-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count|total)$", "", m)
        for e in exprs
        for m in re.findall(r"kvroute_\w+", e)
    }
    metrics = PickerMetrics()
    feeds = {
        "scrapes": dataclasses.asdict(ScrapeStats()),
        "kv_events": dataclasses.asdict(EventStats()),
        "discovery": dataclasses.asdict(StaticDiscoveryStats()),
    }
    metrics.watch_pool(PodRegistry(), lambda: feeds)
    exported = {m.name for m in metrics.registry.collect()}
    assert used <= exported, used - exported
    assert len(dash["panels"]) >= 10
