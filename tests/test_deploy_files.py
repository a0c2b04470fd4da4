"""The deployment files (Kubernetes, Istio, Envoy, Dockerfile, Grafana) agree with the code.

Each YAML is loaded, the picker's container arguments are parsed by the real `kvroute` CLI
parser, and names, ports, probes and metric names are checked against the constants the
server uses. Envoy bootstraps are also checked by `envoy --mode validate` when envoy exists.
"""

from __future__ import annotations

import argparse
import contextlib
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
from tests.test_deploy_crs import NO_ENVOY, requires_envoy

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
PLAIN_ISTIO = by_kind("istio/plain-istio")


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
    (volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
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
    # The picker is started as GAIE's EPP is: with the pool's name; selector and ports come
    # from the pool (router/discovery/inference_pool.py).
    assert args.pool_name == pool["metadata"]["name"]
    assert args.pool_selector is None and args.pool_target_port is None
    assert pool["spec"]["targetPorts"] and pool["spec"]["selector"]["matchLabels"]
    route = one(ISTIO, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])
    rule = one(ISTIO, "DestinationRule")
    assert rule["spec"]["host"] == ref["name"]


def test_envoy_filter_matches_the_shipped_full_duplex_bootstrap() -> None:
    ef = one(PLAIN_ISTIO, "EnvoyFilter")
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
    vs = one(PLAIN_ISTIO, "VirtualService")
    (route,) = [h for h in vs["spec"]["http"] if "route" in h]
    paths = {m["uri"]["exact"] for m in route["match"]}
    assert paths == {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    mappers = hcm_patch["patch"]["value"]["typed_config"]["local_reply_config"]["mappers"]
    boot_hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    # Each mapper the filter installs is one the shipped bootstrap has (same JSON bodies).
    shipped_mappers = boot_hcm["typed_config"]["local_reply_config"]["mappers"]
    assert mappers and all(m in shipped_mappers for m in mappers)
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


@requires_envoy
@pytest.mark.parametrize("mode", sorted(BOOTSTRAPS))
def test_envoy_accepts_the_bootstrap(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_bootstrap(mode, listen_port=10000, admin_port=10001, picker_port=9002))
    binary = envoy_binary()
    assert binary is not None, NO_ENVOY
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


# --- GAIE's dashboard against a running picker ----------------------------------------------

GAIE_QUERIES = json.loads(
    (ROOT / "tests" / "deploy_schemas" / "gaie-dashboard-queries.json").read_text()
)
GAIE_MODEL = "m"


async def _one_request(grpc_port: int, model: str) -> None:
    """One chat completion through the picker as Envoy drives it (full duplex both ways),
    answered with a JSON body carrying usage."""
    import grpc
    from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from tests.extproc.extproc_client import (
        body_msg,
        headers_msg,
        post_headers,
        response_body_msg,
        response_headers_msg,
    )

    full_duplex = ProcessingMode.FULL_DUPLEX_STREAMED
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi " * 30}]})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        call = pb_grpc.ExternalProcessorStub(ch).Process()
        await call.write(headers_msg(post_headers(), mode=full_duplex, response_mode=full_duplex))
        await call.write(body_msg(body.encode(), True))
        first = await call.read()
        if first.WhichOneof("response") == "immediate_response":
            call.cancel()
            return
        await call.read()
        await call.write(response_headers_msg(200, "application/json"))
        await call.read()
        usage = {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}
        answer = {"choices": [{"message": {"content": "ok"}}], "usage": usage}
        await call.write(response_body_msg(json.dumps(answer).encode(), True))
        await call.read()
        await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.read()


@contextlib.asynccontextmanager
async def _running_picker(pods_list_models: bool = True) -> Any:
    """`kvroute serve`'s PickerServer on free loopback ports, over one emulated vLLM pod.
    With `pods_list_models` False the pod lists no models, as under Kubernetes discovery, and
    the model is declared as `kvroute serve --served-model m` does."""
    from envoy_extproc.server import PickerServer
    from envoy_extproc.settings import ExtProcSettings
    from router.emulator.server import EmulatorPod
    from router.emulator.settings import EmulatorSettings

    pod_settings = EmulatorSettings(port=0, speedup=50.0, num_gpu_blocks=4096, model=GAIE_MODEL)
    async with EmulatorPod(pod_settings) as pod:
        models = f", models: [{GAIE_MODEL}]" if pods_list_models else ""
        config = parse_config(f"pods:\n  - {{endpoint: '{pod.endpoint}'{models}}}\n")
        settings = ExtProcSettings(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0)
        declared = () if pods_list_models else (GAIE_MODEL,)
        async with PickerServer(config, settings, served_models=declared) as server:
            yield server


async def _scrape(server: Any) -> dict[str, list[Any]]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as c:
        page = (await c.get(f"http://127.0.0.1:{server.ports.metrics}/metrics")).text
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


async def test_gaie_dashboard_queries_find_series_after_one_request() -> None:
    async with _running_picker() as server:
        await _one_request(server.ports.grpc, GAIE_MODEL)
        await _one_request(server.ports.grpc, "no-such-model")  # an error series too
        samples = await _scrape(server)
    unsupported = set(GAIE_QUERIES["unsupported"])
    for q in GAIE_QUERIES["queries"]:
        assert q["series"] in q["expr"], q  # the vendored name is the one the query reads
        if q["series"] in unsupported:
            assert q["series"] not in samples
            continue
        found = samples.get(q["series"], [])
        assert found, f"{q['panel']}: no {q['series']} series"
        assert any(set(q["by"]) <= set(s.labels) for s in found), (q, found[0].labels)
    # GAIE's values are kvroute's values.
    ok = samples["inference_objective_request_total"]
    assert {(s.labels["model_name"], s.value) for s in ok if s.labels["model_name"] == "m"} == {
        ("m", 1.0)
    }
    kv_ok = samples["kvroute_requests_total"]
    assert sum(s.value for s in kv_ok if s.labels["model"] == "m") == 1.0
    # The response body passed through the picker (full duplex): its length is counted.
    (sizes,) = [
        s
        for s in samples["inference_objective_response_sizes_count"]
        if s.labels["model_name"] == "m"
    ]
    assert sizes.value == 1.0
    (pool,) = samples["inference_pool_ready_pods"]
    assert (pool.labels, pool.value) == ({"name": "kvroute"}, 1.0)


@pytest.mark.parametrize("pods_list_models", [True, False], ids=["listed", "discovered"])
async def test_random_model_names_mint_no_label_values(pods_list_models: bool) -> None:
    """Listed: the random models are refused (no pod serves them). Discovered: pods list no
    models, so the picker routes them, and they complete: every family still says `other`."""
    import random

    rng = random.Random(7)
    names = ["".join(rng.choices("abcdefghij", k=12)) for _ in range(5)]
    async with _running_picker(pods_list_models) as server:
        await _one_request(server.ports.grpc, GAIE_MODEL)
        for name in names:
            await _one_request(server.ports.grpc, name)
        samples = await _scrape(server)
    seen: set[str] = set()
    for name, group in samples.items():
        if name.startswith(("kvroute_", "inference_")):
            for s in group:
                for label in ("model", "model_name", "target_model_name"):
                    if label in s.labels:
                        seen.add(s.labels[label])
    assert seen <= {GAIE_MODEL, "other", "-"}, seen
    assert "other" in seen  # the random names were counted, under one value
    assert not seen & set(names)
    if not pods_list_models:  # routed and completed, under `other`
        done = samples["inference_objective_request_total"]
        assert {s.labels["model_name"]: s.value for s in done} == {GAIE_MODEL: 1.0, "other": 5.0}
        assert any(
            s.labels.get("model") == "other"
            for s in samples["kvroute_time_to_first_token_seconds_count"]
        )


# --- the hardened pod -----------------------------------------------------------------------


def test_picker_pod_runs_under_the_restricted_pod_security_standard() -> None:
    """What PSA `restricted` requires, plus a read-only root with a writable /tmp."""
    pod = one(K8S, "Deployment")["spec"]["template"]["spec"]
    _, container = picker_args()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert writable == {"/tmp"}
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"} <= empty_dirs
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    # The image's user is the pod's user, so files it ships are readable.
    image_user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert image_user and int(image_user.group(1)) == pod["securityContext"]["runAsUser"]
    assert container["image"].startswith("REGISTRY/")  # the documented placeholder


def test_two_replicas_with_a_disruption_budget_and_shared_state_documented() -> None:
    dep = one(K8S, "Deployment")
    pdb = one(K8S, "PodDisruptionBudget")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] == 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    cm_text = (CONFIGS / "kubernetes" / "configmap.yaml").read_text()
    commented = "\n".join(
        line.strip().removeprefix("# ") for line in cm_text.splitlines() if "#" in line
    )
    block = commented[commented.index("shared_state:") :]
    shared = yaml.safe_load("\n".join(block.splitlines()[:4]))["shared_state"]
    from router.shared_state.settings import SharedStateSettings

    assert set(shared) <= {f.name for f in dataclasses.fields(SharedStateSettings)}


def test_prometheus_finds_the_metrics_port_by_annotation_and_service_monitor() -> None:
    dep = one(K8S, "Deployment")
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == METRICS_PORT
    assert notes["prometheus.io/path"] == "/metrics"
    (sm,) = by_kind("kubernetes/prometheus-operator")["ServiceMonitor"]
    svc = one(K8S, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == METRICS_PORT and endpoint["path"] == "/metrics"


def test_pre_stop_and_lame_duck_match_the_picker_defaults() -> None:
    """The manifest's --lame-duck/--grace-period are the picker's own defaults, so running
    the image without them shuts down the same way."""
    from envoy_extproc.settings import ExtProcSettings

    args, _ = picker_args()
    assert args.lame_duck == ExtProcSettings().lame_duck_s
    assert args.grace_period == ExtProcSettings().grace_period_s
