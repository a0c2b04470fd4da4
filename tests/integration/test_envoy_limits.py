"""Envoy's limits as shipped: a body over 16 MiB gets the OpenAI-shaped JSON 413 in every body
mode (Envoy's own refusal in BUFFERED mode included), and the bootstraps carry sized circuit
breakers and receive the picker's `envoy.lb` metadata."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from envoy_stack import MODES, chat, requires_envoy

from envoy_extproc.envoy_process import EXT_PROC_FILTER, render_bootstrap
from envoy_extproc.messages import DESTINATION_HEADER

pytestmark = requires_envoy

LIMIT = 16 * 1024 * 1024


@pytest.mark.parametrize("mode", MODES)
async def test_a_body_over_the_limit_gets_json_413_in_every_mode(envoy_stack, mode):
    async with envoy_stack(mode=mode, n_pods=1) as stack:
        # Over the listener's 1 MiB connection buffer, under the routes' 16 MiB body limit.
        fits = await stack.client.post("/v1/chat/completions", json=chat("y " * 1_500_000))
        assert fits.status_code == 200, fits.text
        big = chat("x" * (LIMIT + 1024 * 1024))
        r = await stack.client.post("/v1/chat/completions", json=big)
        assert r.status_code == 413
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["code"] == 413 and "16777216" in err["message"]
        assert err["type"] == "RequestEntityTooLargeError"
        assert len(stack.pods[0].received) == 1  # the big one was refused before any pod
        # The same connection pool keeps serving normal requests afterwards.
        ok = await stack.client.post("/v1/chat/completions", json=chat("hello"))
        assert ok.status_code == 200


def _strip_destination_header(doc: dict[str, Any]) -> None:
    """Routes remove x-gateway-destination-endpoint, leaving only the `envoy.lb` metadata."""
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for vhost in f["typed_config"]["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        if "route" in route:
                            route["request_headers_to_remove"] = [DESTINATION_HEADER]


async def test_the_envoy_lb_metadata_routes_when_the_header_is_gone(envoy_stack):
    """GAIE's second channel: with the header removed on the route, Envoy still reaches the
    picked pod through the `envoy.lb` metadata it was told to receive (metadata_options)."""
    async with envoy_stack(n_pods=3, envoy_transform=_strip_destination_header) as stack:
        for i in range(6):
            r = await stack.client.post("/v1/chat/completions", json=chat(f"meta {i} " * 40))
            assert r.status_code == 200
        landed = [p.endpoint for p in stack.pods for _ in p.received]
        picked = [d.target for d in stack.decisions]
        assert sorted(landed) == sorted(picked) and len(landed) == 6
        # The header really was gone: no pod saw it.
        assert all(DESTINATION_HEADER not in rcv.headers for p in stack.pods for rcv in p.received)


def _strip_header_and_metadata_options(doc: dict[str, Any]) -> None:
    _strip_destination_header(doc)
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for h in f["typed_config"]["http_filters"]:
                    if h["name"] == EXT_PROC_FILTER:
                        h["typed_config"].pop("metadata_options")


async def test_without_metadata_options_the_header_is_the_only_route(envoy_stack):
    """The control of the test above: Envoy drops the picker's metadata unless told to
    receive it, so with the header gone the request has no pod (503, JSON)."""
    async with envoy_stack(n_pods=1, envoy_transform=_strip_header_and_metadata_options) as s:
        r = await s.client.post("/v1/chat/completions", json=chat("no metadata"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
        assert s.pods[0].received == []


@pytest.mark.parametrize("mode", MODES)
def test_bootstraps_size_breakers_buffers_and_receive_envoy_lb(mode):
    doc = yaml.safe_load(render_bootstrap(mode, listen_port=1, admin_port=2, picker_port=3))
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    for name in ("kvroute_picker", "inference_pool"):
        limits = clusters[name]["circuit_breakers"]["thresholds"][0]
        assert limits["max_requests"] == 16384  # not Envoy's default 1,024
    assert "grpc_health_check" in clusters["kvroute_picker"]["health_checks"][0]
    listener = doc["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 1024 * 1024
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(h for h in hcm["http_filters"] if h["name"] == EXT_PROC_FILTER)
    assert ext_proc["typed_config"]["metadata_options"]["receiving_namespaces"] == {
        "untyped": ["envoy.lb"]
    }
    routes = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]
    assert {r["request_body_buffer_limit"] for r in routes} == {LIMIT}
