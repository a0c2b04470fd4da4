"""`predicted-ttft-scorer`: the formula, the score's ratios, the hot-spot guard, online learning."""

from __future__ import annotations

import math

import pytest

from router.config import ConfigError, default_config
from router.pods import MetricsSnapshot
from router.scheduler import Scheduler
from scorers.predicted_ttft import DEFAULT_PROFILE, PredictedTTFTScorer, profile_rates
from tests.scorers.conftest import ENDPOINTS, context, pods, scheduler_with, token_request

A, B, C = ENDPOINTS
BS = 16  # tokens per block in the conftest scheduler (chars mode, 64 chars per block)


def scorer_of(sched: Scheduler) -> PredictedTTFTScorer:
    plugin = sched.plugins["predicted-ttft-scorer"]
    assert isinstance(plugin, PredictedTTFTScorer)
    return plugin


def prefix(n_tokens: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n_tokens))


def test_prediction_is_the_documented_sum_of_its_parts() -> None:
    sched = scheduler_with("predicted-ttft-scorer")
    sc = scorer_of(sched)
    r = profile_rates(DEFAULT_PROFILE, 8192)
    pod = sched.registry[A]
    pod.inflight_prefill_tokens = 20_000
    pod.inflight_requests = 40
    sched.registry.set_metrics(A, MetricsSnapshot(running=30, kv_utilization=0.5, taken_at=0.0))
    req = token_request(prefix(2048))
    parts = sc.predict(context(sched, req), pod)
    running = 40  # the router's own count beats the stale scrape (30)
    work = 20_000 + 2048
    steps = math.ceil(work / (8192 - running))
    assert parts["queued_tokens"] == 20_000 and parts["uncached_tokens"] == 2048
    assert parts["running"] == running
    assert parts["queued_prefill_s"] == pytest.approx(20_000 * r.token_s)
    assert parts["own_prefill_s"] == pytest.approx(2048 * r.token_s)
    assert parts["decode_interference_s"] == pytest.approx(
        steps * (r.step_s + running * r.decode_s)
    )
    projected = 0.5 + work / r.capacity_tokens
    assert projected < 0.9 and parts["kv_pressure_s"] == 0.0
    total = sum(parts[k] for k in ("queued_prefill_s", "own_prefill_s", "decode_interference_s"))
    assert parts["predicted_ttft_s"] == pytest.approx(total)


def test_prior_rates_come_from_the_latency_profile() -> None:
    from router.sim.latency import LatencyModel, load_profile

    r = profile_rates(DEFAULT_PROFILE, 8192)
    model = LatencyModel(load_profile(DEFAULT_PROFILE))
    # A full 8k-token prefill step predicted from the rates equals the latency model's.
    assert r.step_s + 8192 * r.token_s == pytest.approx(model.prefill_time(8192))
    slower = profile_rates("llama-3.3-70b-fp8-h100-tp4", 8192)
    assert slower.token_s > 2 * r.token_s  # a 70B model prefills far slower per token


def test_score_keeps_ratios_and_the_lowest_prediction_wins() -> None:
    sched = scheduler_with("predicted-ttft-scorer")
    sched.registry[A].inflight_prefill_tokens = 30_000
    sched.registry[B].inflight_prefill_tokens = 10_000
    req = token_request(prefix(1024, 5))
    d = sched.schedule(req)
    assert d.target == C
    by_pod = {s.endpoint: s for s in d.results["default"].pods}
    details = {ep: s.details["predicted-ttft-scorer"] for ep, s in by_pod.items()}
    cost = {ep: x["routing_cost_s"] for ep, x in details.items()}
    best = min(cost.values())
    for ep, s in by_pod.items():
        assert s.scores["predicted-ttft-scorer"] == pytest.approx(best / cost[ep])
        x = details[ep]
        # Two pods of three have queued work: the recompute charge is 2/3 of workWeight (1).
        assert x["work_charge"] == pytest.approx(2 / 3)
        # A cold prompt seeds its prefix, but no pod has held requests yet: no placement charge.
        assert x["placement_s"] == 0.0 and x["inflight_share"] == 1.0
        assert x["routing_cost_s"] == pytest.approx(
            x["predicted_ttft_s"] + 2 / 3 * x["own_prefill_s"] + x["placement_s"]
        )
    assert by_pod[C].total == pytest.approx(1.0)
    assert min(details, key=lambda ep: details[ep]["predicted_ttft_s"]) == C


@pytest.mark.parametrize("work_weight", [0.0, 1.0])
def test_hot_prefix_pod_is_left_when_its_queue_costs_more_than_recomputing(
    work_weight: float,
) -> None:
    sched = scheduler_with("predicted-ttft-scorer", {"workWeight": work_weight})
    hot = prefix(6144)
    sched.precise_index.add_blocks(A, sched.keyer.keys(token_request([*hot, 1])))
    ask = token_request(hot + prefix(64, 90_000))
    # Recomputing the prefix elsewhere costs 6,144 tokens of prefill, charged 1 + workWeight·ρ
    # times (the wait, and the work it adds there); ρ = 1/3: one pod of three has a queue.
    breakeven = (1.0 + work_weight / 3) * 6144
    # A queue shorter than that on the pod holding the prefix: it still wins.
    sched.registry[A].inflight_prefill_tokens = int(0.8 * breakeven)
    assert sched.schedule(ask).target == A
    # Once its queue costs more than recomputing the prefix on an idle pod, it loses.
    sched.registry[A].inflight_prefill_tokens = int(1.2 * breakeven)
    d = sched.schedule(ask)
    assert d.target in (B, C)
    assert d.uncached_tokens >= 6144  # the prefix is recomputed there: now it lives on two pods


def test_burst_of_one_group_spreads_only_when_queueing_outweighs_the_cache() -> None:
    """Committed picks of one group's requests (pending entries make the prefix visible at
    once): they pile onto the first pod until its queue is worth a recompute elsewhere."""
    sched = scheduler_with("predicted-ttft-scorer")
    sys_prompt = prefix(6144)
    targets = []
    recomputed = []
    for i in range(100):
        d = sched.schedule(token_request(sys_prompt + prefix(128, 50_000 + 200 * i)))
        sched.on_pick(d)
        targets.append(d.target)
        if d.uncached_tokens >= 6144:
            recomputed.append(d.target)
    first = targets[0]
    assert targets[1] == first  # the cached prefix beats an idle pod at first
    assert len(set(targets)) > 1  # but the hot spot is relieved once the queue grows
    # Each pod computes the prefix once; its pending entry makes the rest hit there.
    assert sorted(recomputed) == sorted(set(targets))


def test_recompute_is_charged_once_per_request_waiting_on_the_typical_pod() -> None:
    """Under load, the work a recompute adds delays the requests that queue behind it: the
    charge is workWeight · ρ · (1 + n̄), n̄ the candidates' median count before first token
    (a single hot pod's queue does not count: it is not where the recompute would go)."""
    sched = scheduler_with("predicted-ttft-scorer")
    sched.registry.set_metrics(A, MetricsSnapshot(waiting=4, taken_at=0.0))
    sched.registry.set_metrics(B, MetricsSnapshot(waiting=6, taken_at=0.0))
    sched.registry[C].inflight_prefilling = 1
    sched.registry[C].inflight_prefill_tokens = 500
    d = sched.schedule(token_request(prefix(1024, 5)))
    for s in d.results["default"].pods:
        x = s.details["predicted-ttft-scorer"]
        assert (x["followers"], x["work_charge"]) == (4.0, pytest.approx(5.0))
        assert x["routing_cost_s"] == pytest.approx(
            x["predicted_ttft_s"] + 5.0 * x["own_prefill_s"] + x["placement_s"] + x["eviction_s"]
        )
    hot = scheduler_with("predicted-ttft-scorer")
    hot.registry.set_metrics(A, MetricsSnapshot(waiting=40, taken_at=0.0))
    d = hot.schedule(token_request(prefix(1024, 5)))
    x = d.results["default"].pods[0].details["predicted-ttft-scorer"]
    assert x["followers"] == 0.0 and x["work_charge"] == pytest.approx(1 / 3)


def fill_cache(sched: Scheduler, endpoint: str, blocks: int, start: int) -> None:
    """`endpoint` holds `blocks` blocks of prompts nobody asks for, in a cache of that size."""
    sched.registry.set_metrics(
        endpoint, MetricsSnapshot(block_size=BS, num_gpu_blocks=blocks, taken_at=0.0)
    )
    sched.precise_index.add_blocks(endpoint, [10**9 + start + i for i in range(blocks)])


@pytest.mark.parametrize("eviction_weight", [0.0, 4.0])
def test_a_full_cache_charges_the_blocks_a_recompute_would_evict(eviction_weight: float) -> None:
    """Every pod's cache is full; A holds the prompt's prefix and has a queue. Recomputing
    the prefix elsewhere evicts blocks that traffic would hit later: with the charge (the
    default) the group stays with its holder, without it the prefix moves."""
    sched = scheduler_with("predicted-ttft-scorer", {"evictionWeight": eviction_weight})
    for i, ep in enumerate(ENDPOINTS):
        fill_cache(sched, ep, 4000, 10**6 * i)
    hot = prefix(6144)
    sched.precise_index.add_blocks(A, sched.keyer.keys(token_request([*hot, 1])))
    sched.registry[A].inflight_prefill_tokens = 12_000  # a recompute elsewhere is cheaper
    d = sched.schedule(token_request(hot + prefix(64, 90_000)))
    parts = {s.endpoint: s.details["predicted-ttft-scorer"] for s in d.results["default"].pods}
    sc = scorer_of(sched)
    for x in parts.values():
        assert x["cache_fullness"] == 1.0
        assert x["eviction_s"] == pytest.approx(eviction_weight * sc.reuse() * x["own_prefill_s"])
    assert parts[B]["eviction_s"] > parts[A]["eviction_s"] or not eviction_weight
    assert (d.target == A) == bool(eviction_weight)


def test_an_empty_cache_charges_no_eviction_and_capacity_comes_from_the_scrape() -> None:
    sched = scheduler_with("predicted-ttft-scorer")
    sc = scorer_of(sched)
    fill_cache(sched, A, 100, 0)
    sched.registry.set_metrics(A, MetricsSnapshot(block_size=BS, num_gpu_blocks=400, taken_at=0.0))
    d = sched.schedule(token_request(prefix(1024, 5)))
    parts = {s.endpoint: s.details["predicted-ttft-scorer"] for s in d.results["default"].pods}
    assert sc.capacity_tokens(sched.registry[A]) == 400 * BS
    assert parts[A]["cache_fullness"] == pytest.approx(0.25)
    # No scrape says B's size: the profile's capacity, of which B holds nothing.
    assert sc.capacity_tokens(sched.registry[B]) == sc.rates.capacity_tokens
    assert parts[B]["cache_fullness"] == 0.0 and parts[B]["eviction_s"] == 0.0
    assert d.target != A


def test_kv_pressure_penalises_a_pod_near_a_full_cache() -> None:
    sched = scheduler_with("predicted-ttft-scorer")
    sched.registry.set_metrics(A, MetricsSnapshot(kv_utilization=0.99, taken_at=0.0))
    sched.registry.set_metrics(B, MetricsSnapshot(kv_utilization=0.20, taken_at=0.0))
    sched.registry.set_metrics(C, MetricsSnapshot(kv_utilization=0.20, taken_at=0.0))
    req = token_request(prefix(512))
    sc = scorer_of(sched)
    ctx = context(sched, req)
    full = sc.predict(ctx, sched.registry[A])
    assert full["kv_pressure_s"] == pytest.approx(
        (0.99 + 512 / sc.rates.capacity_tokens - 0.9) / 0.1
    )
    assert sc.predict(ctx, sched.registry[B])["kv_pressure_s"] == 0.0
    assert sched.schedule(req).target != A


def test_scraped_queue_we_did_not_send_counts_as_work() -> None:
    sched = scheduler_with("predicted-ttft-scorer")
    sc = scorer_of(sched)
    req = token_request(prefix(1000))
    sched.registry.set_metrics(A, MetricsSnapshot(waiting=5, taken_at=0.0))
    ctx = context(sched, req)
    # No request of ours is queued there: the five waiting ones are another client's,
    # sized like this request until the pod has a mean of its own.
    assert sc.predict(ctx, sched.registry[A])["queued_tokens"] == 5 * 1000
    assert sc.predict(ctx, sched.registry[B])["queued_tokens"] == 0


def true_ttft(details: dict[str, float], slowness: float) -> float:
    """A pod `slowness` times slower than the profile in everything: its TTFT for a pick."""
    modelled = details["predicted_ttft_s"] - details["kv_pressure_s"]
    return slowness * modelled / details["rate_factor"]


def observe_a(sched: Scheduler, n: int, slowness: float, start: int = 0) -> None:
    """`n` cold 1,500-token prompts on pod A, one a second, answered `slowness` times slower
    than the profile predicts."""
    for i in range(start, start + n):
        d = sched.schedule(token_request(prefix(1500, 9000 * i)), subset=[A], now=float(i))
        sched.on_pick(d, float(i))
        p = d.results["default"].pods[0].details["predicted-ttft-scorer"]
        true = true_ttft(p, slowness)
        sched.on_first_token(d, i + true)
        sched.on_complete(d, None, i + true)


def test_online_fit_learns_a_slow_pod_and_steers_traffic_away() -> None:
    sched = scheduler_with("predicted-ttft-scorer")
    sc = scorer_of(sched)
    # An older GPU, the profile's (give or take 1.2x), a bigger TP degree.
    slow = {A: 3.0, B: 1.2, C: 0.4}
    now = 0.0
    for i in range(120):
        for ep in ENDPOINTS:
            req = token_request(prefix(512 + (i % 7) * 300, 50_000 + 5000 * (3 * i + len(ep))))
            d = sched.schedule(req, subset=[ep], now=now)
            sched.on_pick(d, now)
            p = d.results["default"].pods[0].details["predicted-ttft-scorer"]
            sched.on_first_token(d, now + true_ttft(p, slow[ep]))
            sched.on_complete(d, {"completion_tokens": 1}, now + 1.0)
            now += 1.0
    fleet = sc.fleet_factor()
    # About the pods' geometric mean (the last pods observed weigh a little more).
    assert fleet == pytest.approx(math.exp(sum(map(math.log, slow.values())) / 3), rel=0.05)
    # A and C are further than podTolerance (1.5x) from the fleet: priced as they are,
    # barely shrunk towards the fleet. B is within it: priced as the fleet.
    assert sc.factor(A) == pytest.approx(3.0, rel=0.05)
    assert sc.factor(C) == pytest.approx(0.4, rel=0.05)
    assert sc.factor(B) == fleet
    # On an idle fleet a long prompt now goes to the fastest pod, never to the slow one.
    picks = {
        sched.schedule(token_request(prefix(4000, 10**7 + 9000 * j))).target for j in range(20)
    }
    assert picks == {C}


def test_idle_fleet_costs_pure_predicted_ttft() -> None:
    sched = scheduler_with("predicted-ttft-scorer", {"workWeight": 5.0})
    d = sched.schedule(token_request(prefix(3000)))
    for s in d.results["default"].pods:
        x = s.details["predicted-ttft-scorer"]
        assert x["work_charge"] == 0.0 and x["routing_cost_s"] == x["predicted_ttft_s"]


def test_cold_groups_spread_evenly_by_the_load_they_draw() -> None:
    """Twelve equally popular groups, each request in flight for 0.5 s, each group asking
    from its holder: the cold prompts follow the requests each pod kept in flight, so no pod
    ends more than one group off the even four (and no follower ever leaves its holder)."""
    sched = scheduler_with("predicted-ttft-scorer")
    home: dict[int, str] = {}
    open_: list[tuple[float, object]] = []
    t = 0.0
    systems = [prefix(2048, 10**6 * (g + 1)) for g in range(12)]

    def send(ids: list[int]) -> str:
        for end, d in [x for x in open_ if x[0] <= t]:
            sched.on_first_token(d, end - 0.4)
            sched.on_complete(d, None, end)
            open_.remove((end, d))
        d = sched.schedule(token_request(ids), now=t)
        sched.on_pick(d, t)
        open_.append((t + 0.5, d))
        return d.target

    for g in range(12):
        home[g] = send([*systems[g], 1])
        # Every group seen so far keeps asking, each from its holder.
        for _ in range(3):
            for h in range(g + 1):
                t += 0.02
                assert send([*systems[h], *prefix(16, int(t * 1000))]) == home[h]
    per_pod = [list(home.values()).count(ep) for ep in ENDPOINTS]
    assert sum(per_pod) == 12 and max(per_pod) - min(per_pod) <= 2 and min(per_pod) >= 3


def test_inflight_placement_follows_the_requests_a_pod_held_over_the_horizon() -> None:
    """placementLoad inflight (the default): A held many requests in flight for the last
    half minute (its sessions' decodes) and drained just now; a cold prompt goes to B or C,
    charged nothing there, while a prompt A holds still goes to A."""
    sched = scheduler_with("predicted-ttft-scorer")
    pod_a = sched.registry[A]
    held = prefix(2048, 777)
    sched.precise_index.add_blocks(A, sched.keyer.keys(token_request([*held, 1])))
    for t in range(30):
        pod_a.inflight_requests = 12
        for ep in (B, C):
            sched.registry[ep].inflight_requests = 2
        sched.schedule(token_request([*held, *prefix(16, 10 * t)]), now=float(t))
    for ep in ENDPOINTS:
        sched.registry[ep].inflight_requests = 0
    cold = sched.schedule(token_request(prefix(2048, 5 * 10**6)), now=30.0)
    assert cold.target in (B, C)
    parts = {s.endpoint: s.details["predicted-ttft-scorer"] for s in cold.results["default"].pods}
    assert parts[A]["inflight_share"] > parts[B]["inflight_share"] == parts[C]["inflight_share"]
    assert parts[A]["placement_s"] > 0.0 and parts[B]["placement_s"] == 0.0
    assert sched.schedule(token_request([*held, 5]), now=30.0).target == A


def test_cold_prefixes_are_placed_by_long_run_wait_and_hits_stay_with_their_holder() -> None:
    """placementLoad wait: pod A was busy for the last half minute but is idle right now: a
    cold prompt goes to an idle pod that was not; a prompt A holds still goes to A."""
    sched = scheduler_with("predicted-ttft-scorer", {"placementLoad": "wait"})
    pod_a = sched.registry[A]
    for t in range(30):
        pod_a.inflight_prefill_tokens = 40_000  # A's queue while it was busy
        sched.schedule(token_request(prefix(200, 10**6 + 1000 * t)), now=float(t))
    pod_a.inflight_prefill_tokens = 0  # ... and drained just now
    held = prefix(4096, 777)
    sched.precise_index.add_blocks(A, sched.keyer.keys(token_request([*held, 1])))
    cold = sched.schedule(token_request(prefix(4096, 5 * 10**6)), now=30.0)
    assert cold.target in (B, C)
    parts = {s.endpoint: s.details["predicted-ttft-scorer"] for s in cold.results["default"].pods}
    assert parts[A]["predicted_ttft_s"] == pytest.approx(parts[B]["predicted_ttft_s"])
    assert parts[A]["placement_s"] > 0.1 and parts[B]["placement_s"] == 0.0
    hit = sched.schedule(token_request([*held, *prefix(64, 9 * 10**6)]), now=30.0)
    assert hit.target == A
    # Turned off, the cold prompt sees three equal idle pods (no placement term).
    plain = scheduler_with("predicted-ttft-scorer", {"loadHorizonS": 0.0})
    d = plain.schedule(token_request(prefix(4096, 5 * 10**6)), now=30.0)
    assert "placement_s" not in d.results["default"].pods[0].details["predicted-ttft-scorer"]


def test_a_wrong_profile_is_corrected_for_pods_never_observed() -> None:
    """Every pod is 4x slower than the profile: observing one pod moves the fleet's factor,
    so an unobserved pod does not look faster merely for keeping the profile's prior."""
    sched = scheduler_with("predicted-ttft-scorer")
    sc = scorer_of(sched)
    observe_a(sched, 40, 4.0)
    assert sc.fleet_factor() == pytest.approx(4.0, rel=0.01)
    assert sc.factor(B) == sc.factor(A) == sc.fleet_factor()
    # The fleet's factor scales every second of the prediction: rankings are unchanged.
    ctx = context(sched, token_request(prefix(1500, 10**7)))
    parts = sc.predict(ctx, sched.registry[B])
    assert parts["rate_factor"] == sc.fleet_factor()
    assert parts["own_prefill_s"] == pytest.approx(4.0 * 1500 * sc.rates.token_s, rel=0.01)


def test_no_learning_keeps_the_prior() -> None:
    sched = scheduler_with("predicted-ttft-scorer", {"learn": False})
    sc = scorer_of(sched)
    d = sched.schedule(token_request(prefix(800)))
    sched.on_pick(d, 0.0)
    sched.on_first_token(d, 50.0)
    assert sc.factor(d.target) == 1.0 and sc.fleet.n == 0.0


@pytest.mark.parametrize(
    "state",
    [
        MetricsSnapshot(waiting=3, taken_at=0.0),
        MetricsSnapshot(kv_utilization=0.95, taken_at=0.0),
        None,  # a short hit: its step, not its tokens, times it
    ],
    ids=["scraped-queue", "cache-near-full", "short-hit"],
)
def test_observations_the_model_does_not_explain_are_not_learnt(
    state: MetricsSnapshot | None,
) -> None:
    """Requests held for KV blocks or behind a queue the router did not send, and short hits
    timed by overheads, would make the pod look several times slower than it is."""
    sched = scheduler_with("predicted-ttft-scorer")
    sc = scorer_of(sched)
    if state is not None:
        sched.registry.set_metrics(A, state)
    size = 1500 if state is not None else 8
    for i in range(20):
        d = sched.schedule(token_request(prefix(size, 9000 * i)), subset=[A], now=float(i))
        sched.on_pick(d, float(i))
        sched.on_first_token(d, i + 5.0)  # far slower than any prediction
    assert sc.fleet.n == 0.0 and sc.factor(A) == 1.0


def test_one_far_off_observation_is_clipped() -> None:
    sched = scheduler_with("predicted-ttft-scorer")
    sc = scorer_of(sched)
    observe_a(sched, 30, 1.0)
    before = sc.fleet_factor()
    observe_a(sched, 1, 1000.0, start=40)  # a thousand times slower, once
    # Counted as 4x: the mean of logs moves by log 4 over the weight, not by log 1000 (and
    # the ridge, `ridge` observations at the profile's rates, weighs in).
    assert before == pytest.approx(1.0)
    assert sc.fleet_factor() == pytest.approx(4.0 ** (1.0 / (sc.fleet.n + sc.ridge)), rel=1e-6)


def test_hooks_balance_the_prefilling_count() -> None:
    """The pods' count of requests before their first token (the `own` the scorer subtracts
    from the scraped queue) rises at each pick and falls once per request."""
    sched = scheduler_with("predicted-ttft-scorer")

    def prefilling() -> int:
        return sum(p.inflight_prefilling for p in sched.registry.all())

    decisions = []
    for i in range(5):
        d = sched.schedule(token_request(prefix(300, 7000 * i)))
        sched.on_pick(d, 0.0)
        decisions.append(d)
    assert prefilling() == 5
    sched.on_first_token(decisions[0], 0.1)
    sched.on_failure(decisions[1], decisions[1].target, 0.1)
    sched.on_complete(decisions[2], None, 0.2)  # completion without a first token seen
    sched.on_complete(decisions[0], None, 0.3)  # already closed: counted once
    assert prefilling() == 2


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"colour": "red"}, "colour"),
        ({"mode": "psychic"}, "psychic"),
        ({"profile": "no-such-gpu"}, "llama-3.1-8b-h100"),
        ({"kvKnee": 1.5}, "kvKnee"),
        ({"decay": 0.0}, "decay"),
        ({"maxNumBatchedTokens": "lots"}, "maxNumBatchedTokens"),
        ({"loadHorizonS": -1.0}, "loadHorizonS"),
        ({"placementLoad": "vibes"}, "inflight, wait"),
        ({"evictionWeight": -1.0}, "evictionWeight"),
        ({"podTolerance": 0.5}, "podTolerance"),
    ],
)
def test_bad_parameters_are_errors_naming_them(params: dict, needle: str) -> None:
    with pytest.raises((ValueError, ConfigError)) as exc:
        scheduler_with("predicted-ttft-scorer", params)
    assert needle in str(exc.value)


def test_default_config_routes_by_predicted_ttft() -> None:
    cfg = default_config()
    names = [r.ref for r in cfg.profiles[0].plugins]
    assert names == ["predicted-ttft-scorer", "max-score-picker"]
    sched = Scheduler(cfg)
    assert any(isinstance(p, PredictedTTFTScorer) for p in sched.plugins.values())
    assert pods(sched) == []
