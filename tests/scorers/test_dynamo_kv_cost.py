"""`dynamo-kv-cost`: Dynamo's block cost pinned against hand-computed costs.

Every case uses 16-token blocks and a 64-token prompt (4 blocks, keys k0..k3) unless it says
otherwise, so the arithmetic can be checked by eye.
"""

from __future__ import annotations

import math
import random

import pytest

from router.index import Tier
from router.scheduler import Scheduler
from scorers.base import ParameterError
from scorers.dynamo_kv_cost import DynamoKvCostScorer, WorkerCost
from tests.scorers.conftest import ENDPOINTS, context, pods, scheduler_with, token_request

A, B, C = ENDPOINTS
BS = 16
PROMPT = list(range(5000, 5000 + 4 * BS))


def peer(params: dict | None = None, **kw: object) -> Scheduler:
    return scheduler_with("dynamo-kv-cost", params, pending=False, **kw)  # type: ignore[arg-type]


def plugin(sched: Scheduler) -> DynamoKvCostScorer:
    p = sched.plugins["dynamo-kv-cost"]
    assert isinstance(p, DynamoKvCostScorer)
    return p


def costs(sched: Scheduler, ids: list[int] = PROMPT) -> dict[str, WorkerCost]:
    ctx = context(sched, token_request(ids))
    return {c.endpoint: c for c in plugin(sched).costs(ctx, pods(sched))}


def keys_of(sched: Scheduler, ids: list[int] = PROMPT) -> list[int]:
    return sched.keyer.keys(token_request(ids))


def test_device_overlap_credit_and_decode_blocks() -> None:
    sched = peer()
    k = keys_of(sched)
    sched.precise_index.add_blocks(A, k[:2])
    c = costs(sched)
    # a: prefill = 64/16 - 1.0*2 = 2; decode = 0 active + 4 new; cost 6.
    assert (c[A].device_blocks, c[A].prefill_blocks, c[A].decode_blocks, c[A].cost) == (
        2,
        2.0,
        4,
        6.0,
    )
    # b: prefill 4, decode 4, cost 8.
    assert (c[B].prefill_blocks, c[B].decode_blocks, c[B].cost) == (4.0, 4, 8.0)
    d = sched.schedule(token_request(PROMPT))
    assert d.target == A


def test_host_and_disk_tiers_earn_partial_credit() -> None:
    sched = peer()
    k = keys_of(sched)
    idx = sched.precise_index
    idx.add_blocks(A, k[:1])
    idx.add_blocks(A, k[1:2], tier=Tier.CPU)
    idx.add_blocks(A, k[2:3], tier=Tier.DISK)
    # b: CPU first, then GPU: the device match is 0 blocks, the host match reaches 2.
    idx.add_blocks(B, k[:1], tier=Tier.CPU)
    idx.add_blocks(B, k[1:2])
    c = costs(sched)
    assert (c[A].device_blocks, c[A].host_blocks, c[A].disk_blocks) == (1, 1, 1)
    # a: credit = 1 + 0.75 + 0.25 = 2.0 → prefill 2.0; decode 4 → cost 6.0.
    assert c[A].prefill_blocks == pytest.approx(2.0) and c[A].cost == pytest.approx(6.0)
    assert (c[B].device_blocks, c[B].host_blocks, c[B].disk_blocks) == (0, 2, 0)
    # b: credit = 0.75 * 2 = 1.5 → prefill 2.5; cost 6.5.
    assert c[B].cost == pytest.approx(6.5)


def test_tier_weights_are_parameters() -> None:
    sched = peer({"host_cache_hit_weight": 1.0, "disk_cache_hit_weight": 0.0})
    k = keys_of(sched)
    sched.precise_index.add_blocks(A, k[:1], tier=Tier.CPU)
    sched.precise_index.add_blocks(A, k[1:2], tier=Tier.DISK)
    c = costs(sched)[A]
    # credit = 1.0 * 1 (host) + 0.0 * 1 (disk) → prefill 3; decode 4.
    assert (c.host_blocks, c.disk_blocks, c.cost) == (1, 1, 7.0)


def test_router_tracked_prefill_tokens_and_load_scale() -> None:
    sched = peer({"prefill_load_scale": 2.0})
    k = keys_of(sched)
    sched.precise_index.add_blocks(A, k[:2])
    sched.registry[A].inflight_prefill_tokens = 32
    c = costs(sched)
    # a: prefill = (32 + 64)/16 - 2 = 4, scaled ×2 = 8; + decode 4 → 12.
    assert c[A].prefill_blocks == 4.0 and c[A].cost == 12.0
    # b: 2 × 4 + 4 = 12: an exact tie with a.
    assert c[B].cost == 12.0


def test_prefill_is_floored_at_zero() -> None:
    sched = peer({"overlap_score_credit": 3.0})
    sched.precise_index.add_blocks(A, keys_of(sched))
    c = costs(sched)[A]
    # 4 - 3*4 < 0 → 0; decode 4.
    assert (c.prefill_blocks, c.cost) == (0.0, 4.0)


def test_active_blocks_count_live_requests_and_shared_blocks_once() -> None:
    sched = peer({"decode_active_request_weight": 0.5}, seed=3)
    first = sched.schedule(token_request(PROMPT))
    sched.on_pick(first)
    t = first.target
    other = list(range(5000, 5000 + 2 * BS)) + list(range(9000, 9000 + 2 * BS))
    c = costs(sched, other)
    # t: the first request's 64 uncached tokens are still queued there (the scheduler's
    # accounting), so prefill = (64 + 64)/16 = 8; decode = 4 active blocks + 2 new (k0, k1
    # are shared); + 0.5 × 1 request in flight.
    assert sched.registry[t].inflight_prefill_tokens == 64
    assert c[t].decode_blocks == 6
    assert c[t].cost == pytest.approx(8.0 + 6 + 0.5)
    sched.on_first_token(first)
    assert costs(sched, other)[t].cost == pytest.approx(4.0 + 6 + 0.5)
    sched.on_complete(first, None)
    c = costs(sched, other)
    assert c[t].decode_blocks == 4 and plugin(sched).active == {}


def test_failure_releases_active_blocks() -> None:
    sched = peer()
    d = sched.schedule(token_request(PROMPT))
    sched.on_pick(d)
    assert len(plugin(sched).active[d.target]) == 4
    sched.on_failure(d, d.target)
    assert plugin(sched).active == {}


def test_exact_ties_are_broken_at_random() -> None:
    sched = peer(seed=7)
    targets = {sched.schedule(token_request(PROMPT)).target for _ in range(60)}
    assert targets == set(ENDPOINTS)  # all cost 8: every pod gets picked


def test_lowest_cost_wins_at_temperature_zero() -> None:
    sched = peer()
    sched.precise_index.add_blocks(C, keys_of(sched)[:1])
    assert {sched.schedule(token_request(PROMPT)).target for _ in range(20)} == {C}


def test_softmin_samples_range_normalised_costs() -> None:
    scorer = plugin(peer({"router_temperature": 0.5}))
    ctx = context(peer(), token_request(PROMPT))
    ctx.rng = random.Random(11)
    costs_ = [10.0, 12.0, 14.0]
    draws = [scorer.pick(ctx, costs_) for _ in range(6000)]
    # p_i ∝ exp(-(c_i - 10) / ((14 - 10) × 0.5)) = exp(0), exp(-1), exp(-2).
    w = [1.0, math.exp(-1.0), math.exp(-2.0)]
    for i in range(3):
        assert draws.count(i) / len(draws) == pytest.approx(w[i] / sum(w), abs=0.02)
    # Scale-free: the same costs ×100 give the same probabilities.
    ctx.rng = random.Random(11)
    assert [scorer.pick(ctx, [c * 100 for c in costs_]) for _ in range(6000)] == draws


def test_softmin_with_equal_costs_is_uniform() -> None:
    scorer = plugin(peer({"router_temperature": 1.0}))
    ctx = context(peer(), token_request(PROMPT))
    ctx.rng = random.Random(5)
    draws = [scorer.pick(ctx, [3.0, 3.0]) for _ in range(2000)]
    assert draws.count(0) / 2000 == pytest.approx(0.5, abs=0.04)


def test_older_name_of_prefill_load_scale_is_accepted() -> None:
    assert plugin(peer({"overlap_score_weight": 2.5})).prefill_load_scale == 2.5
    with pytest.raises(ParameterError, match="not both"):
        peer({"overlap_score_weight": 2.5, "prefill_load_scale": 1.0})


def test_bad_parameters_are_errors_naming_them() -> None:
    with pytest.raises(ParameterError, match="router_temperature"):
        peer({"router_temperature": -1.0})
    with pytest.raises(ParameterError, match="mode"):
        peer({"mode": "exact"})
    with pytest.raises(ParameterError, match="known"):
        peer({"kv_block_size": 16})


def test_explanation_shows_each_pods_cost_and_parts() -> None:
    sched = peer()
    sched.precise_index.add_blocks(A, keys_of(sched)[:2])
    pods_ = {p["endpoint"]: p for p in sched.schedule(token_request(PROMPT)).explain()["pods"]}
    parts = pods_[A]["details"]["dynamo-kv-cost"]
    assert parts["cost"] == 6.0 and parts["prefill_blocks"] == 2.0 and parts["device_blocks"] == 2
    assert pods_[A]["scores"]["dynamo-kv-cost"] == 1.0
    assert pods_[B]["details"]["dynamo-kv-cost"]["cost"] == 8.0


def test_without_kv_events_the_overlap_comes_from_its_own_picks() -> None:
    sched = peer({"mode": "approximate"})
    first = sched.schedule(token_request(PROMPT))
    sched.on_pick(first)
    sched.on_complete(first, None)
    c = costs(sched)
    assert c[first.target].device_blocks == 4  # the approximate index the scheduler fills
    assert all(c[ep].device_blocks == 0 for ep in ENDPOINTS if ep != first.target)
    assert sched.schedule(token_request(PROMPT)).target == first.target
