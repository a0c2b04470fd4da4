"""The pieces every face shares: router-only field stripping, the path policy, endpoint
normalisation of the sidecar's allowlist, and the `request:` config section."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import ConfigError, load_config, parse_config
from router.request import (
    RequestError,
    RequestSettings,
    parse_request,
    path_action,
    strip_router_fields,
)
from router.sidecar import PrefillAllowlist, SidecarSettings, canonical_endpoint

DEFAULT = RequestSettings()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


def test_defaults_are_the_interface_contract() -> None:
    assert DEFAULT.routed_paths == ("/v1/completions", "/v1/chat/completions")
    assert DEFAULT.strip_fields == ("kv_transfer_params",)
    assert parse_config("").request == DEFAULT


def test_strip_removes_the_field_and_its_vllm_xargs_entry_and_reports_them() -> None:
    body = {
        "model": "m",
        "kv_transfer_params": {"remote_host": "10.0.0.1"},
        "vllm_xargs": {"kv_transfer_params": "{}", "other": 1},
        "nested": {"remote_host": "x", "keep": 2},
    }
    removed = strip_router_fields(body, ("kv_transfer_params", "nested.remote_host"))
    assert removed == ["kv_transfer_params", "vllm_xargs.kv_transfer_params", "nested.remote_host"]
    assert body == {"model": "m", "vllm_xargs": {"other": 1}, "nested": {"keep": 2}}
    assert strip_router_fields(body, ("kv_transfer_params", "nested.remote_host")) == []


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), json_values, json_values)
def test_strip_leaves_no_router_field_and_touches_nothing_else(
    body: dict, params: object, xarg: object
) -> None:
    body = {k: v for k, v in body.items() if k not in ("kv_transfer_params", "vllm_xargs")}
    kept = dict(body)
    attacked = {**body, "kv_transfer_params": params, "vllm_xargs": {"kv_transfer_params": xarg}}
    removed = strip_router_fields(attacked, DEFAULT.strip_fields)
    assert removed == ["kv_transfer_params", "vllm_xargs.kv_transfer_params"]
    assert attacked == {**kept, "vllm_xargs": {}}
    assert strip_router_fields(kept, DEFAULT.strip_fields) == [] and kept == body


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/completions", "route"),
        ("POST", "/v1/chat/completions?api-version=1", "route"),
        ("GET", "/v1/models", "models"),
        ("HEAD", "/v1/models", "models"),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
        ("POST", "/completions", 404),
        ("GET", "/metrics", 404),
        ("POST", "/admin/faults", 404),
        ("POST", "/v1/completions/", 404),
        ("POST", "/v1/completions/../../admin/faults", 404),
        ("POST", "/V1/completions", 404),
        ("POST", "/v1/embeddings", 404),
    ],
)
def test_path_policy(method: str, path: str, expected: str | int) -> None:
    if isinstance(expected, str):
        assert path_action(method, path) == expected
        return
    with pytest.raises(RequestError) as e:
        path_action(method, path)
    assert e.value.status == expected
    assert e.value.to_json()["error"]["code"] in ("unknown_path", "method_not_allowed")


def test_a_config_can_route_more_paths_and_they_parse() -> None:
    settings = parse_config(
        "request:\n  routed_paths: [/v1/completions, /v1/chat/completions, /v1/embeddings]\n"
    ).request
    assert path_action("POST", "/v1/embeddings", settings) == "route"
    req = parse_request(b'{"model": "e", "input": "embed me"}', "/v1/embeddings", None, settings)
    assert (req.kind, req.prompt, req.model) == ("other", "embed me", "e")
    with pytest.raises(RequestError):
        parse_request(b'{"model": "e"}', "/v1/rerank", None, settings)


def test_request_section_errors_name_the_field_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("seed: 1\nrequest:\n  routed_paths: [/v1/completions]\n  strip_feilds: []\n")
    with pytest.raises(ConfigError, match=r"router\.yaml:4: unknown field 'request\.strip_feilds'"):
        load_config(path)
    path.write_text("request:\n  routed_paths: [v1/completions]\n")
    with pytest.raises(ConfigError, match=r"router\.yaml:1: request: request\.routed_paths"):
        load_config(path)
    path.write_text("request:\n  routed_paths: [/v1/models]\n")
    with pytest.raises(ConfigError, match="the router answers that one"):
        load_config(path)
    path.write_text("request:\n  strip_fields: [kv_transfer_params, 'a..b']\n")
    with pytest.raises(ConfigError, match=r"'a\.\.b' is not a field name"):
        load_config(path)


# ------------------------------------------------------------------ endpoint normalisation
@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("127.0.0.1:8000", "localhost:8000"),
        ("127.0.0.1:8000", "[::1]:8000"),
        ("127.0.0.1:8000", "LOCALHOST.:8000"),
        ("127.0.0.1:8000", "[::ffff:127.0.0.1]:8000"),
        ("127.0.0.1:8000", " 127.0.0.1:08000 "),
        ("Pod-1.Pool.svc.:8000", "pod-1.pool.svc:8000"),
        ("[2001:DB8::1]:80", "[2001:db8:0:0::1]:80"),
    ],
)
def test_equal_endpoints_normalise_alike(a: str, b: str) -> None:
    assert canonical_endpoint(a) == canonical_endpoint(b) is not None


@pytest.mark.parametrize(
    "bad",
    ["", "host", "host:", "host:0", "host:70000", "u@host:80", "host/x:80", "[::1:80", "::1:80"],
)
def test_malformed_endpoints_normalise_to_none(bad: str) -> None:
    assert canonical_endpoint(bad) is None


@given(st.ip_addresses(), st.integers(1, 65535))
def test_every_spelling_of_an_address_normalises_alike(ip: object, port: int) -> None:
    addr = ipaddress.ip_address(ip)  # type: ignore[arg-type]
    plain = f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
    exploded = f"[{addr.exploded.upper()}]:{port}" if addr.version == 6 else plain
    assert canonical_endpoint(plain) == canonical_endpoint(exploded) is not None


def test_allowlist_answers_with_its_own_spelling_and_refuses_the_rest() -> None:
    allow = PrefillAllowlist(SidecarSettings(decode="127.0.0.1:1", allow=("10.0.0.7:8000",)))
    assert allow.lookup("10.0.0.7:8000") == "10.0.0.7:8000"
    assert allow.lookup("[::ffff:10.0.0.7]:8000") == "10.0.0.7:8000"
    for other in ("10.0.0.7:8001", "10.0.0.70:8000", "167772167:8000", "x@10.0.0.7:8000"):
        assert allow.lookup(other) is None, other
