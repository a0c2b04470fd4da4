"""The emulator answers like vLLM 0.32, field by field, on the same requests.

One comparison per package run (`parity` fixture): `tests/real_vllm/parity.py` sends the same
requests to one of the fixture's real vLLM pods and to an in-process emulator pod configured
like it (model name `tiny`, the model folder's tokenizer, block size 32, max_model_len 2048),
and diffs the answers. Each test below owns one surface and fails on any row that is not a
`KNOWN_DIFFERENCES` entry (README: "Emulator vs vLLM"). The full table goes to the terminal
past pytest's capture; `python -m tests.real_vllm.parity --fleet FILE` prints it on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.real_vllm.conftest import _report
from tests.real_vllm.parity import (
    KNOWN_DIFFERENCES,
    EventSink,
    Row,
    compare,
    table,
    unexplained,
)
from tests.real_vllm.vllm_pods import MAX_MODEL_LEN, VllmFleet

Comparison = tuple[list[Row], dict[str, Any], dict[str, Any]]


def _sink_for(fleet: VllmFleet) -> EventSink:
    """Bind mode: the pods' PUBs connect to the fleet's router address (no proxy runs while
    this module's fixture does); connect mode: to the first pod's bound PUB."""
    if fleet.router_events_endpoint:
        return EventSink(fleet.router_events_endpoint, bind=True)
    return EventSink(fleet.pods[0].events_endpoint.replace("*", "127.0.0.1"), bind=False)


@pytest.fixture(scope="module")
def parity(vllm_fleet: VllmFleet) -> Iterator[Comparison]:
    pod = vllm_fleet.pods[0]
    tokenizer = str(pod.model_dir / "tokenizer.json")

    async def run() -> Comparison:
        sink = _sink_for(vllm_fleet)
        sink.open()
        try:
            return await compare(pod.url, sink, tokenizer, MAX_MODEL_LEN)
        finally:
            sink.close()

    result = asyncio.run(run())
    rows = result[0]
    _report(
        table(
            rows, f"emulator vs vLLM 0.32: {len(rows)} rows, {len(unexplained(rows))} unexplained"
        )
    )
    yield result


def _surface(rows: list[Row], *prefixes: str) -> list[Row]:
    return [r for r in rows if r.field.startswith(prefixes)]


def _assert_same(rows: list[Row], *prefixes: str) -> None:
    bad = unexplained(_surface(rows, *prefixes))
    assert not bad, "\n" + table(bad, "differences from vLLM")


def test_kv_event_batches_match_vllms_wire_form(parity: Comparison) -> None:
    rows, real, emu = parity
    # The comparison saw a stored block on both sides, with the same tokens (same tokenizer,
    # BOS, block size): the rest of the event is compared field by field.
    for side in (real, emu):
        assert side["events"]["frames"] == 3 and side["events"]["batch_form"] == "array of 3"
    (stored_real,) = real["events"]["events"]
    (stored_emu,) = emu["events"]["events"]
    assert stored_real["token_ids"] == stored_emu["token_ids"] and stored_real["block_size"] == 32
    _assert_same(rows, "events")


def test_metrics_families_types_and_labels_match(parity: Comparison) -> None:
    rows, _real, emu = parity
    for family in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_cached_total",
        "vllm:request_prefill_time_seconds_bucket",
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"}',
        'vllm:cache_config_info{_block_size_resolved="True",block_size="32"',
    ):
        assert family in emu["metrics"], family
    _assert_same(rows, "metrics")


def test_completion_and_chat_bodies_match(parity: Comparison) -> None:
    rows, real, emu = parity
    for name in ("completion", "chat"):
        assert real[name]["status"] == emu[name]["status"] == 200
        assert real[name]["body"]["usage"] == emu[name]["body"]["usage"]
    _assert_same(rows, "completion.", "chat.")


def test_sse_chunks_and_final_usage_chunk_match(parity: Comparison) -> None:
    rows, real, emu = parity
    for name in ("completion_stream", "chat_stream"):
        assert real[name]["usage"]["usage"] == emu[name]["usage"]["usage"]
        assert real[name]["done"] == emu[name]["done"] == "[DONE]"
    _assert_same(rows, "completion_stream", "chat_stream")


def test_error_bodies_and_statuses_match(parity: Comparison) -> None:
    rows, real, emu = parity
    errors = [k for k in real if k.startswith("error_")]
    assert len(errors) == 10
    for name in errors:
        assert real[name]["status"] == emu[name]["status"] >= 400, name
    _assert_same(rows, "error_")


def test_models_tokenize_detokenize_health_ping_match(parity: Comparison) -> None:
    rows, real, emu = parity
    assert real["tokenize"]["body"]["tokens"] == emu["tokenize"]["body"]["tokens"]
    assert real["tokenize_chat"]["body"] == emu["tokenize_chat"]["body"]
    _assert_same(rows, "models", "tokenize", "detokenize", "health", "ping", "version")


def test_every_known_difference_is_still_a_difference(parity: Comparison) -> None:
    """A kept difference the emulator no longer has must leave the list (and the README)."""
    rows, _real, _emu = parity
    for key in KNOWN_DIFFERENCES:
        assert any(r.field.startswith(key) for r in rows), f"{key} now matches vLLM"


def test_readme_lists_every_known_difference() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Emulator vs vLLM", 1)[1].split("\n## ", 1)[0]
    for key in KNOWN_DIFFERENCES:
        name = key.removeprefix("metrics.")
        assert name in section, f"README 'Emulator vs vLLM' does not list {name}"
