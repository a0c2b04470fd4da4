"""The `tracing:` and `logging:` config sections, the reload diff and the logging set-up."""

from __future__ import annotations

import io
import json
import logging

import pytest

from router.config import ConfigError, parse_config
from router.config_reload import config_changes, in_force
from router.log_setup import setup_logging


def test_defaults_are_tracing_off_info_text_and_no_access_log():
    config = parse_config("")
    assert config.tracing.enabled is False
    assert (config.logging.level, config.logging.format) == ("info", "text")
    assert config.logging.access_log is False


def test_the_sections_are_read_field_by_field():
    config = parse_config(
        "tracing: {enabled: true, endpoint: 'https://otel.example:4318/v1/traces',"
        " sample_ratio: 0.25}\nlogging: {level: debug, format: json, access_log: true}\n"
    )
    assert config.tracing.endpoint == "https://otel.example:4318/v1/traces"
    assert config.tracing.sample_ratio == 0.25
    assert (config.logging.level, config.logging.format) == ("debug", "json")
    assert config.logging.access_log is True


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("tracing: {endpoint: 'collector:4318'}", "tracing.endpoint 'collector:4318'"),
        ("tracing: {endpoint: 'ftp://collector'}", "tracing.endpoint 'ftp://collector'"),
        ("tracing: {sample_ratio: 1.5}", "tracing.sample_ratio must be in [0, 1]"),
        ("tracing: {sample_ratio: -0.1}", "tracing.sample_ratio must be in [0, 1]"),
        ("logging: {level: loud}", "logging.level must be one of"),
        ("logging: {format: xml}", "logging.format must be one of"),
        ("logging: {colour: true}", "unknown field 'logging.colour'"),
    ],
)
def test_bad_values_are_config_errors_naming_the_field(text, named):
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(text + "\n")
    assert named in str(e.value)
    assert str(e.value).startswith("<string>:1:")


def test_the_reload_diff_names_fields_and_keeps_those_that_need_a_restart():
    old = parse_config("proxy: {retries: 1, port: 8080}\n")
    new = parse_config(
        "# moved down a line\nproxy: {retries: 2, port: 9090}\nlogging: {level: debug}\n"
        "blocks: {mode: chars, chars_per_block: 32}\n"
    )
    change = config_changes(old, new, live_fields={"proxy.retries"})
    assert change.live == ("proxy.retries", "logging.level")
    assert change.restart == ("blocks.chars_per_block", "proxy.port")
    assert not change.rebuild_scheduler  # the default profile, on other lines, is no change
    kept = in_force(old, new, change)
    assert kept.proxy.retries == 2 and kept.proxy.port == 8080
    assert kept.blocks == old.blocks and kept.logging.level == "debug"
    assert "restart needed for blocks.chars_per_block, proxy.port" in change.summary()


def test_json_logs_are_one_object_per_line_with_extra_fields():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    out = io.StringIO()
    try:
        setup_logging("info", "json", stream=out)
        setup_logging("info", "json", stream=out)  # again (a reload): still one handler
        logging.getLogger("kvroute.test").warning("pod %s ejected", "p1", extra={"pod": "p1"})
        logging.getLogger("httpx").info("HTTP Request: GET /metrics")  # held to warnings
        logging.getLogger("kvroute.test").debug("below the level")
    finally:
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
        root.setLevel(level)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "warning" and record["logger"] == "kvroute.test"
    assert record["msg"] == "pod p1 ejected" and record["pod"] == "p1"
    assert record["ts"].endswith("Z")
