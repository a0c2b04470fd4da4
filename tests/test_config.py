"""Config loading: defaults, bundled examples, and errors that name the field and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, default_config, load_config, parse_config
from router.pods import Role
from router.scheduler import Scheduler

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_empty_config_gets_every_default() -> None:
    cfg = default_config()
    assert cfg.blocks.mode == "chars" and cfg.blocks.block_size == 16
    assert cfg.prefix_index.lru_capacity_per_pod == 31_250
    assert cfg.handler.type == "single-profile-handler"
    assert cfg.profiles[0].plugins[0].ref == "predicted-ttft-scorer"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_router_configs_load_and_build_a_scheduler(path: Path) -> None:
    if "pods" not in path.read_text():
        pytest.skip("not a router config")
    cfg = load_config(path)
    assert cfg.pods
    Scheduler(cfg, seed=0)


def test_pd_example_has_roles_and_handler() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "pd.yaml")
    assert {p.role for p in cfg.pods} == {Role.PREFILL, Role.DECODE}
    assert cfg.handler.type == "pd-profile-handler"
    assert cfg.handler.parameters["threshold"] == 256


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("blocks:\n  mode: chars\n  chunk: 3\n", "<t>:3: unknown field 'blocks.chunk'"),
        ("nonsense: 1\n", "<t>:1: unknown field 'nonsense'"),
        ("blocks: {block_size: sixteen}\n", "'blocks.block_size' must be an integer"),
        ("pods:\n  - endpoint: nohost\n", "<t>:2: pods[0].endpoint: 'nohost' is not 'host:port'"),
        ("pods:\n  - {endpoint: a:1, colour: red}\n", "pods[0]: unknown field 'colour'"),
        ("pods:\n  - {endpoint: a:1, role: boss}\n", "pods[0].role: 'boss' is not one of"),
        ("plugins:\n  - type: magic-scorer\n", "<t>:2: unknown plugin type 'magic-scorer'"),
        (
            "plugins:\n  - type: queue-scorer\n    parameters: {depth: 3}\n"
            "schedulingProfiles:\n  - name: d\n    plugins: [{pluginRef: queue-scorer}]\n",
            "plugin 'queue-scorer' has no parameter 'depth'",
        ),
        (
            "plugins:\n  - type: queue-scorer\nschedulingProfiles:\n  - name: d\n"
            "    plugins:\n      - pluginRef: nope\n",
            "<t>:6: profile 'd' refers to unknown plugin 'nope'",
        ),
        ("blocks: {mode: tokens}\n", "needs blocks.tokenizer_path"),
        ("pods: [\n", "not valid YAML"),
        ("seed: yes\n", "seed must be an integer"),
    ],
)
def test_bad_config_errors_name_field_and_line(text: str, needle: str) -> None:
    with pytest.raises((ConfigError, ValueError)) as e:
        cfg = parse_config(text, source="<t>")
        Scheduler(cfg, seed=0)  # plugin parameters are checked when the plugins are built
    assert needle in str(e.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_missing_tokenizer_file_is_one_line_naming_the_path(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("blocks:\n  mode: tokens\n  tokenizer_path: nowhere/tokenizer.json\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{cfg}:3: ") and "nowhere/tokenizer.json" in msg
    assert "cannot read it" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{not json", "not valid JSON"), ('{"version": "1.0"}', "not a tokenizer.json file")],
)
def test_tokenizer_file_that_is_no_tokenizer_is_one_line(
    tmp_path: Path, content: str, needle: str
) -> None:
    tok = tmp_path / "tokenizer.json"
    tok.write_text(content)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"blocks:\n  mode: tokens\n  tokenizer_path: {tok}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value).startswith(f"{cfg}:3: ") and needle in str(e.value)


def test_unknown_prefix_index_mode_names_value_and_line() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("seed: 1\nprefix_index:\n  mode: precize\n", source="r.yaml")
    assert str(e.value).startswith("r.yaml:3: ") and "'precize'" in str(e.value)
