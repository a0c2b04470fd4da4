"""PickerServer's wiring of the state feeds, checked without starting anything."""

from __future__ import annotations

from pathlib import Path

from envoy_extproc.server import PickerServer
from router.config import parse_config

PODS = """\
pods:
  - {endpoint: '127.0.0.1:8001', models: [m], kv_events_endpoint: 'tcp://127.0.0.1:5557'}
  - {endpoint: '127.0.0.1:8002', models: [m]}
"""


def tokenizer(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_pods_with_kv_events_in_token_mode_feed_a_precise_index(tmp_path: Path) -> None:
    blocks = f"blocks: {{mode: tokens, tokenizer_path: '{tokenizer(tmp_path)}'}}\n"
    server = PickerServer(parse_config(PODS + blocks))
    assert server.feeds.precise_index is not None and server.feeds.subscriber is not None
    assert server.feeds.subscriber.settings.mode == "connect"
    assert server.scheduler.precise_index is server.feeds.precise_index
    assert server.scheduler.default_prefix_mode == "precise"


def test_kv_events_are_ignored_in_chars_mode_where_their_keys_cannot_match() -> None:
    server = PickerServer(parse_config(PODS + "blocks: {mode: chars}\n"))
    assert server.feeds.precise_index is None and server.feeds.subscriber is None
    assert server.scheduler.default_prefix_mode == "approximate"


def test_without_kv_events_routing_learns_from_its_own_decisions() -> None:
    server = PickerServer(parse_config("pods:\n  - {endpoint: '127.0.0.1:8001'}\n"))
    assert server.feeds.subscriber is None
    assert server.scheduler.default_prefix_mode == "approximate"
    assert server.feeds.discovery is None  # no file to follow without config_path
