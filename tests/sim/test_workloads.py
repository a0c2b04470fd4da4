"""Synthetic workload generators: determinism, sharing structure, arrival modes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.sim.workloads import (
    WORKLOADS,
    LengthDistribution,
    make_workload,
)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_gives_identical_arrivals(name: str) -> None:
    w1 = make_workload(name, num_requests=60, seed=7)
    w2 = make_workload(name, num_requests=60, seed=7)
    assert len(w1.arrivals) == 60
    for a, b in zip(w1.arrivals, w2.arrivals, strict=True):
        assert (a.time_s, a.session, a.output_len, a.prev) == (
            b.time_s,
            b.session,
            b.output_len,
            b.prev,
        )
        assert _same(a.token_ids, b.token_ids)
        assert a.token_ids.dtype == np.uint32


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_different_seeds_give_different_tokens(name: str) -> None:
    a = make_workload(name, num_requests=5, seed=1).arrivals[0].token_ids
    b = make_workload(name, num_requests=5, seed=2).arrivals[0].token_ids
    assert not _same(a, b)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_open_loop_arrivals_are_time_ordered_and_indexed(name: str) -> None:
    w = make_workload(name, num_requests=80, seed=3)
    times = [a.time_s for a in w.arrivals]
    assert times == sorted(times)
    assert [a.index for a in w.arrivals] == list(range(80))
    assert w.concurrency is None
    assert all(a.output_len >= 1 and a.prompt_len >= 1 for a in w.arrivals)


def test_shared_prompt_requests_share_exactly_their_groups_system_prompt() -> None:
    w = make_workload("shared-prompt", num_requests=200, seed=0, groups=4, system_tokens=512)
    by_group: dict[str, list[np.ndarray]] = {}
    for a in w.arrivals:
        by_group.setdefault(a.session.split("-")[0], []).append(a.token_ids)
    assert len(by_group) == 4
    systems = {g: toks[0][:512] for g, toks in by_group.items()}
    for g, toks in by_group.items():
        for t in toks:
            assert _same(t[:512], systems[g])
            assert len(t) > 512
    # Different groups have different system prompts.
    vals = list(systems.values())
    assert not any(_same(vals[i], vals[j]) for i in range(4) for j in range(i + 1, 4))


def test_shared_prompt_group_skew_makes_first_group_most_popular() -> None:
    w = make_workload("shared-prompt", num_requests=400, seed=0, groups=8, group_skew=1.5)
    counts: dict[str, int] = {}
    for a in w.arrivals:
        g = a.session.split("-")[0]
        counts[g] = counts.get(g, 0) + 1
    assert max(counts, key=counts.__getitem__) == "g0"


def test_multi_turn_prompt_is_previous_prompt_plus_answer_plus_user() -> None:
    w = make_workload("multi-turn", num_requests=300, seed=5)
    followups = [a for a in w.arrivals if a.prev >= 0]
    assert followups, "some sessions must have several turns"
    for a in followups:
        prev = w.arrivals[a.prev]
        assert prev.session == a.session
        assert prev.time_s <= a.time_s
        assert a.think_s > 0
        n = prev.prompt_len
        assert _same(a.token_ids[:n], prev.token_ids)
        assert len(prev.output_token_ids) == prev.output_len
        assert _same(a.token_ids[n : n + prev.output_len], prev.output_token_ids)
        assert a.prompt_len > n + prev.output_len


def test_multi_turn_sessions_share_the_system_prompt_only() -> None:
    w = make_workload("multi-turn", num_requests=100, seed=2, system_tokens=128)
    firsts = [a for a in w.arrivals if a.prev < 0]
    assert len(firsts) >= 2
    for a in firsts[1:]:
        assert _same(a.token_ids[:128], firsts[0].token_ids[:128])
        assert not _same(a.token_ids[128:160], firsts[0].token_ids[128:160])


def test_multi_turn_respects_max_context() -> None:
    w = make_workload("multi-turn", num_requests=200, seed=1, max_context=2000)
    assert max(a.prompt_len for a in w.arrivals) <= 2000


def test_answers_nobody_replays_are_not_kept() -> None:
    w = make_workload("multi-turn", num_requests=200, seed=4)
    replayed = {a.prev for a in w.arrivals if a.prev >= 0}
    for a in w.arrivals:
        assert (len(a.output_token_ids) > 0) == (a.index in replayed)


def test_agentic_steps_extend_a_shared_preamble() -> None:
    w = make_workload("agentic", num_requests=150, seed=9, preamble_tokens=1000)
    first = w.arrivals[0].token_ids[:1000]
    for a in w.arrivals:
        assert _same(a.token_ids[:1000], first)
    steps = [a for a in w.arrivals if a.prev >= 0]
    assert steps
    for a in steps:
        prev = w.arrivals[a.prev]
        assert _same(a.token_ids[: prev.prompt_len], prev.token_ids)
        assert a.prompt_len > prev.prompt_len + prev.output_len


def test_random_prompts_share_no_leading_block() -> None:
    w = make_workload("random", num_requests=100, seed=0)
    heads = {a.token_ids[:16].tobytes() for a in w.arrivals}
    assert len(heads) == 100


def test_closed_loop_mode_is_carried_by_the_workload() -> None:
    w = make_workload(
        "random",
        num_requests=10,
        concurrency=8,
        prompt=LengthDistribution(1024),
        output=LengthDistribution(1024),
    )
    assert w.concurrency == 8
    assert all(a.prompt_len == 1024 and a.output_len == 1024 for a in w.arrivals)


def test_poisson_rate_is_close_to_requested() -> None:
    w = make_workload("random", num_requests=2000, seed=0, rate_per_s=50.0)
    rate = len(w.arrivals) / w.arrivals[-1].time_s
    assert 45 < rate < 55


def test_unknown_workload_and_field_are_named() -> None:
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        make_workload("nope")
    with pytest.raises(ValueError, match=r"no field.*groups"):
        make_workload("random", groups=3)
    with pytest.raises(ValueError, match="num_requests"):
        make_workload("random", num_requests=0)


@settings(max_examples=50, deadline=None)
@given(
    median=st.integers(1, 5000),
    sigma=st.floats(0, 2),
    low=st.integers(1, 100),
    span=st.integers(0, 5000),
    seed=st.integers(0, 2**32 - 1),
)
def test_length_distribution_stays_within_bounds(
    median: int, sigma: float, low: int, span: int, seed: int
) -> None:
    d = LengthDistribution(median, sigma, low, low + span)
    xs = d.sample(np.random.default_rng(seed), 64)
    assert xs.min() >= low and xs.max() <= low + span
