"""`vllm-kv-aware`: vllm-router's kv_aware rules on the precise index, through a real Scheduler."""

from __future__ import annotations

import pytest

from router.scheduler import Scheduler
from scorers.base import ParameterError
from scorers.vllm_kv_aware import SpeculativeBlocks, VllmKvAwareScorer
from tests.scorers.conftest import ENDPOINTS, scheduler_with, token_request

A, B, C = ENDPOINTS
BLOCK = 16
PROMPT = list(range(1000, 1000 + 8 * BLOCK))  # 8 full blocks


def peer(plugin_type: str, params: dict | None = None, **kw: object) -> Scheduler:
    """As the policy's configs run it: without the scheduler's own pending entries."""
    return scheduler_with(plugin_type, params, pending=False, **kw)  # type: ignore[arg-type]


def plugin(sched: Scheduler) -> VllmKvAwareScorer:
    p = sched.plugins["vllm-kv-aware"]
    assert isinstance(p, VllmKvAwareScorer)
    return p


def keys_of(sched: Scheduler, ids: list[int]) -> list[int]:
    return sched.keyer.keys(token_request(ids))


def route(sched: Scheduler, ids: list[int], now: float = 0.0) -> str:
    d = sched.schedule(token_request(ids), now=now)
    sched.on_pick(d, now)
    return d.target


def test_longest_contiguous_prefix_wins_with_no_load_term() -> None:
    sched = peer("vllm-kv-aware")
    keys = keys_of(sched, PROMPT)
    sched.precise_index.add_blocks(A, keys[:1])
    sched.precise_index.add_blocks(B, keys[:3])
    sched.precise_index.add_blocks(C, keys[:1] + keys[2:6])  # a gap after block 0: 1 block
    sched.registry[B].inflight_requests = 500  # load does not matter once a block matches
    assert route(sched, PROMPT) == B


def test_equal_best_matches_go_to_the_last_candidate() -> None:
    sched = peer("vllm-kv-aware")
    keys = keys_of(sched, PROMPT)
    for ep in ENDPOINTS[:2]:
        sched.precise_index.add_blocks(ep, keys[:4])
    assert route(sched, PROMPT) == B  # Rust's max_by_key keeps the last maximum


def test_no_match_falls_back_to_first_least_in_flight_pod() -> None:
    sched = peer("vllm-kv-aware")
    sched.registry[A].inflight_requests = 2
    sched.registry[B].inflight_requests = 1
    sched.registry[C].inflight_requests = 1
    assert route(sched, PROMPT) == B


def test_prompt_shorter_than_a_block_goes_least_loaded_without_speculation() -> None:
    sched = peer("vllm-kv-aware")
    sched.registry[A].inflight_requests = 1
    assert route(sched, list(range(BLOCK - 1))) == B
    assert plugin(sched).speculative.pods() == set()


def test_speculative_insert_covers_blocks_past_the_match_for_two_seconds() -> None:
    sched = peer("vllm-kv-aware")
    keys = keys_of(sched, PROMPT)
    sched.precise_index.add_blocks(C, keys[:2])
    assert route(sched, PROMPT, now=0.0) == C
    spec = plugin(sched).speculative
    assert spec.count(C) == len(keys) - 2  # only the blocks past the best match
    # Before the engine's events arrive, a burst of the same prefix sees all 8 blocks on c.
    sched.precise_index.add_blocks(A, keys[:3])
    assert route(sched, PROMPT, now=1.9) == C
    # A full match inserts nothing new, so the entries from t=0 live until t=2 (inclusive, as
    # vllm-router expires an entry once its age is > the TTL); then only the real index counts
    # (a holds 3 blocks, c 2).
    assert route(sched, PROMPT, now=2.0) == C
    assert route(sched, PROMPT, now=2.001) == A


def test_speculative_entries_live_until_exactly_the_ttl() -> None:
    spec = SpeculativeBlocks(2.0)
    spec.add("p", [1, 2, 3], now=10.0)
    assert spec.holds("p", 2, 12.0)
    assert not spec.holds("p", 2, 12.001)
    spec.add("p", [3], now=11.0)  # re-adding refreshes and moves the key to the back
    spec.purge(12.5)
    assert spec.count("p") == 1 and spec.holds("p", 3, 12.5)
    spec.purge(13.001)
    assert spec.pods() == set()


def test_cold_burst_follows_the_first_pick_through_speculation() -> None:
    sched = peer("vllm-kv-aware")
    first = route(sched, PROMPT, now=0.0)  # no match: least loaded, then speculative insert
    targets = {route(sched, PROMPT + [7] * BLOCK, now=0.1 * i) for i in range(1, 6)}
    assert targets == {first}


def test_speculation_can_be_disabled() -> None:
    sched = peer("vllm-kv-aware", {"enable_speculative": False})
    route(sched, PROMPT)
    assert plugin(sched).speculative.pods() == set()


def test_single_candidate_is_taken_without_scoring() -> None:
    sched = peer("vllm-kv-aware", pods=ENDPOINTS[:1])
    assert route(sched, PROMPT) == A
    assert plugin(sched).speculative.pods() == set()


def test_bad_parameters_are_errors_naming_them() -> None:
    with pytest.raises(ParameterError, match="speculative_ttl_secs"):
        peer("vllm-kv-aware", {"speculative_ttl_secs": 0})
    with pytest.raises(ParameterError, match="known"):
        peer("vllm-kv-aware", {"block_size": 16})
