"""Scheduler, scorers, filters, pickers and profile handlers, driven without sockets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.blocks import char_block_keys
from router.config import parse_config
from router.pods import MetricsSnapshot, Pod, PodRegistry, Role
from router.request import RequestError, RoutingRequest
from router.scheduler import Scheduler
from scorers.registry import PLUGINS

CHARS = 16  # chars per block in these tests

BASE = f"""
blocks: {{mode: chars, chars_per_block: {CHARS}}}
seed: 1
"""

ALL_SCORERS = [name for name, (kind, _) in PLUGINS.items() if kind == "scorer"]


def config_with(profile_yaml: str, pods: int = 4, extra: str = "") -> str:
    pod_lines = "\n".join(
        f"  - {{endpoint: 10.0.0.{i}:8000, models: [m]}}" for i in range(1, pods + 1)
    )
    return f"{BASE}\npods:\n{pod_lines}\n{extra}\n{profile_yaml}"


def single(scorers: list[tuple[str, float]], picker: str = "max-score-picker") -> str:
    plugins = "\n".join(f"  - {{type: {s}}}" for s, _ in scorers)
    refs = "\n".join(f"      - {{pluginRef: {s}, weight: {w}}}" for s, w in scorers)
    return f"""
plugins:
{plugins}
  - {{type: {picker}}}
schedulingProfiles:
  - name: default
    plugins:
{refs}
      - {{pluginRef: {picker}}}
"""


def req(prompt: str, **kw: object) -> RoutingRequest:
    return RoutingRequest(model=kw.pop("model", "m"), prompt=prompt, segments=(prompt,), **kw)


def make(yaml_text: str, seed: int = 1) -> Scheduler:
    return Scheduler(parse_config(yaml_text), seed=seed, clock=lambda: 0.0)


PROMPT = "system prompt shared by many requests; " * 4 + "question one"


def test_prefix_scorer_prefers_pod_holding_longest_prefix() -> None:
    s = make(config_with(single([("prefix-cache-scorer", 1.0)])))
    keys = char_block_keys(PROMPT, CHARS)
    s.prefix_index().add_blocks("10.0.0.3:8000", keys)
    s.prefix_index().add_blocks("10.0.0.2:8000", keys[:2])
    d = s.schedule(req(PROMPT))
    assert d.target == "10.0.0.3:8000"
    assert d.fallbacks[0] == "10.0.0.2:8000"
    by_ep = {p.endpoint: p for p in d.results["default"].pods}
    assert by_ep["10.0.0.3:8000"].prefix_hit == pytest.approx(1.0)
    assert by_ep["10.0.0.2:8000"].prefix_hit == pytest.approx(2 / len(keys))
    assert d.uncached_tokens < d.prompt_tokens


def test_approximate_prefix_learns_from_its_own_picks() -> None:
    s = make(config_with(single([("prefix-cache-scorer", 3.0), ("active-request-scorer", 1.0)])))
    first = s.schedule(req(PROMPT))
    s.on_pick(first)
    s.on_complete(first, {"prompt_tokens": 10})
    again = s.schedule(req(PROMPT + " and a follow-up"))
    assert again.target == first.target


def test_queue_and_kv_scorers_prefer_idle_pod() -> None:
    s = make(config_with(single([("queue-scorer", 1.0), ("kv-cache-utilization-scorer", 1.0)])))
    for i, (w, kv) in enumerate([(5, 0.9), (0, 0.1), (3, 0.5), (9, 0.99)], start=1):
        s.registry.set_metrics(f"10.0.0.{i}:8000", MetricsSnapshot(waiting=w, kv_utilization=kv))
    assert s.schedule(req("hello")).target == "10.0.0.2:8000"


def test_scorer_that_cannot_tell_pods_apart_gives_zero() -> None:
    s = make(config_with(single([("queue-scorer", 1.0), ("session-affinity-scorer", 1.0)])))
    d = s.schedule(req("hello"))
    for pod in d.results["default"].pods:
        assert pod.scores == {"queue-scorer": 0.0, "session-affinity-scorer": 0.0}


def test_session_affinity_follows_last_pick_and_forgets_on_failure() -> None:
    s = make(config_with(single([("session-affinity-scorer", 1.0)])))
    d1 = s.schedule(req("a", session_key="s"))
    s.on_pick(d1)
    for _ in range(5):
        assert s.schedule(req("b", session_key="s")).target == d1.target
    s.on_failure(d1, d1.target)
    scores = {
        p.endpoint: p.scores["session-affinity-scorer"]
        for p in s.schedule(req("c", session_key="s")).results["default"].pods
    }
    assert set(scores.values()) == {0.0}


def test_in_flight_accounting_round_trips_through_hooks() -> None:
    s = make(config_with(single([("uncached-tokens-load-scorer", 1.0)])))
    d = s.schedule(req(PROMPT))
    s.on_pick(d)
    pod = s.registry[d.target]
    assert pod.inflight_requests == 1
    assert pod.inflight_prefill_tokens == d.uncached_tokens > 0
    s.on_first_token(d)
    assert pod.inflight_prefill_tokens == 0
    s.on_complete(d)
    s.on_complete(d)  # a second completion report changes nothing
    assert pod.inflight_requests == 0


def test_uncached_tokens_scorer_avoids_pod_with_pending_prefill() -> None:
    s = make(config_with(single([("uncached-tokens-load-scorer", 1.0)]), pods=2))
    busy = s.schedule(req("x" * 4000))
    s.on_pick(busy)
    nxt = s.schedule(req("y" * 400))
    assert nxt.target != busy.target


def test_lora_affinity_prefers_pod_with_adapter_loaded() -> None:
    s = make(config_with(single([("lora-affinity-scorer", 1.0)])))
    s.registry.set_metrics("10.0.0.4:8000", MetricsSnapshot(running_adapters=frozenset({"sql"})))
    for p in s.registry:
        p.adapters = frozenset({"sql"})
    assert s.schedule(req("q", model="sql", lora_adapter="sql")).target == "10.0.0.4:8000"


def test_no_hit_lru_spreads_cold_requests() -> None:
    s = make(config_with(single([("no-hit-lru-scorer", 1.0)]), extra=""))
    seen = []
    for i in range(4):
        d = s.schedule(req(f"cold {i}"), now=float(i))
        s.on_pick(d, now=float(i))
        seen.append(d.target)
    assert len(set(seen)) == 4


def test_load_aware_scorer_is_absolute() -> None:
    s = make(config_with(single([("load-aware-scorer", 1.0)])))
    s.registry.set_metrics("10.0.0.1:8000", MetricsSnapshot(waiting=64))
    pods = {p.endpoint: p.total for p in s.schedule(req("q")).results["default"].pods}
    assert pods["10.0.0.1:8000"] == pytest.approx(0.5)
    assert pods["10.0.0.2:8000"] == pytest.approx(1.0)


def test_unknown_model_is_404_and_unhealthy_fleet_is_503() -> None:
    s = make(config_with(single([("queue-scorer", 1.0)])))
    with pytest.raises(RequestError) as e:
        s.schedule(req("q", model="other"))
    assert e.value.status == 404
    for p in s.registry:
        s.registry.set_health(p.endpoint, False)
    with pytest.raises(RequestError) as e:
        s.schedule(req("q"))
    assert e.value.status == 503


def test_subset_hint_restricts_candidates() -> None:
    s = make(config_with(single([("queue-scorer", 1.0)])))
    assert s.schedule(req("q"), subset=["10.0.0.3:8000"]).target == "10.0.0.3:8000"
    with pytest.raises(RequestError) as e:
        s.schedule(req("q"), subset=["10.9.9.9:1"])
    assert e.value.status == 503


def test_sheddable_request_refused_when_all_saturated() -> None:
    s = make(config_with(single([("queue-scorer", 1.0)])))
    for p in s.registry:
        s.registry.set_metrics(p.endpoint, MetricsSnapshot(waiting=50))
    with pytest.raises(RequestError) as e:
        s.schedule(req("q", priority=-1))
    assert e.value.status == 429
    assert s.schedule(req("q")).target  # critical requests still go through


def test_removed_pod_takes_its_index_entries() -> None:
    s = make(config_with(single([("prefix-cache-scorer", 1.0)])))
    s.prefix_index().add_blocks("10.0.0.1:8000", char_block_keys(PROMPT, CHARS))
    s.registry.remove("10.0.0.1:8000")
    assert s.prefix_index().entry_count() == 0


def test_label_selector_and_affinity_filters() -> None:
    yaml_text = f"""{BASE}
pods:
  - {{endpoint: 10.0.0.1:8000, labels: {{zone: a}}}}
  - {{endpoint: 10.0.0.2:8000, labels: {{zone: b}}}}
  - {{endpoint: 10.0.0.3:8000, labels: {{zone: b}}}}
plugins:
  - {{type: by-label-selector, parameters: {{matchLabels: {{zone: b}}}}}}
  - type: prefix-cache-affinity-filter
    parameters: {{threshold: 0.5, explorationProbability: 0}}
  - {{type: random-picker}}
schedulingProfiles:
  - name: default
    plugins:
      - {{pluginRef: by-label-selector}}
      - {{pluginRef: prefix-cache-affinity-filter}}
      - {{pluginRef: random-picker}}
"""
    s = make(yaml_text)
    s.prefix_index().add_blocks("10.0.0.3:8000", char_block_keys(PROMPT, CHARS))
    s.prefix_index().add_blocks("10.0.0.1:8000", char_block_keys(PROMPT, CHARS))
    for _ in range(10):
        assert s.schedule(req(PROMPT)).target == "10.0.0.3:8000"
    # A cold prompt: gating keeps everyone of zone b.
    assert {s.schedule(req(f"cold {i}")).target for i in range(30)} == {
        "10.0.0.2:8000",
        "10.0.0.3:8000",
    }


PD = """
pods:
  - {endpoint: 10.0.0.1:8000, role: prefill}
  - {endpoint: 10.0.0.2:8000, role: prefill}
  - {endpoint: 10.0.0.3:8000, role: decode}
  - {endpoint: 10.0.0.4:8000, role: both}
plugins:
  - {type: pd-profile-handler, parameters: {threshold: THRESHOLD}}
  - {type: decode-filter}
  - {type: prefill-filter}
  - {type: prefix-cache-scorer}
  - {type: queue-scorer}
schedulingProfiles:
  - name: decode
    plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 1}]
  - name: prefill
    plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer, weight: 1}]
"""


def test_pd_handler_prefills_remotely_above_threshold_only() -> None:
    s = make(BASE + PD.replace("THRESHOLD", "64"))
    short = s.schedule(req("tiny"))
    assert short.prefill is None and short.target in {"10.0.0.3:8000", "10.0.0.4:8000"}
    long = s.schedule(req("z" * 4000))
    assert long.prefill in {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert long.target in {"10.0.0.3:8000", "10.0.0.4:8000"}
    assert set(long.results) == {"decode", "prefill"}
    # Cached on the decode pod: no remote prefill needed.
    s.prefix_index().add_blocks(long.target, char_block_keys("z" * 4000, CHARS))
    again = s.schedule(req("z" * 4000))
    assert again.prefill is None


def test_pd_threshold_zero_always_prefills_remotely() -> None:
    s = make(BASE + PD.replace("THRESHOLD", "0"))
    assert s.schedule(req("tiny")).prefill is not None


def test_pd_accounting_charges_the_prefill_pod() -> None:
    s = make(BASE + PD.replace("THRESHOLD", "0"))
    d = s.schedule(req("w" * 2000))
    s.on_pick(d)
    assert s.registry[d.prefill].inflight_prefill_tokens == d.uncached_tokens
    assert s.registry[d.target].inflight_requests == 1
    s.on_prefill_done(d)  # the prefill leg ended: its pod is free before the first token
    assert s.registry[d.prefill].inflight_prefill_tokens == 0
    assert s.registry[d.target].inflight_requests == 1
    s.on_first_token(d)
    s.on_complete(d)
    assert s.registry[d.prefill].inflight_prefill_tokens == 0
    assert s.registry[d.target].inflight_requests == 0


def test_round_robin_picker_cycles() -> None:
    s = make(config_with(single([], picker="round-robin-picker")))
    assert [s.schedule(req("q")).target for _ in range(8)] == [
        f"10.0.0.{i}:8000" for i in [1, 2, 3, 4, 1, 2, 3, 4]
    ]


@pytest.mark.parametrize("picker", ["weighted-random-picker", "softmax-picker"])
def test_random_pickers_favour_higher_totals(picker: str) -> None:
    s = make(config_with(single([("prefix-cache-scorer", 1.0)], picker=picker)))
    s.prefix_index().add_blocks("10.0.0.2:8000", char_block_keys(PROMPT, CHARS))
    picks = [s.schedule(req(PROMPT)).target for _ in range(200)]
    assert picks.count("10.0.0.2:8000") > 100


def _random_fleet_scheduler(seed: int, waits: list[int], held: list[int]) -> Scheduler:
    scorers = [(name, 1.0) for name in ALL_SCORERS]
    s = make(config_with(single(scorers), pods=len(waits)), seed=seed)
    keys = char_block_keys(PROMPT, CHARS)
    for i, (w, h) in enumerate(zip(waits, held, strict=True), start=1):
        ep = f"10.0.0.{i}:8000"
        s.registry.set_metrics(ep, MetricsSnapshot(waiting=w, kv_utilization=w / 20))
        s.prefix_index().add_blocks(ep, keys[:h])
    return s


fleets = st.integers(2, 8).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 20), min_size=n, max_size=n),
        st.lists(st.integers(0, 10), min_size=n, max_size=n),
    )
)


@settings(max_examples=40, deadline=None)
@given(fleet=fleets, seed=st.integers(0, 2**16))
def test_every_score_is_in_unit_interval(fleet: tuple[list[int], list[int]], seed: int) -> None:
    s = _random_fleet_scheduler(seed, *fleet)
    d = s.schedule(req(PROMPT, session_key="s", lora_adapter=None))
    for pod in d.results["default"].pods:
        assert set(pod.scores) == set(ALL_SCORERS)
        for v in pod.scores.values():
            assert 0.0 <= v <= 1.0


@settings(max_examples=25, deadline=None)
@given(fleet=fleets, seed=st.integers(0, 2**16))
def test_decisions_are_deterministic_under_a_fixed_seed(
    fleet: tuple[list[int], list[int]], seed: int
) -> None:
    runs = []
    for _ in range(2):
        s = _random_fleet_scheduler(seed, *fleet)
        picks = []
        for i in range(5):
            d = s.schedule(req(PROMPT + str(i)), now=float(i))
            s.on_pick(d, now=float(i))
            picks.append((d.target, tuple(d.fallbacks)))
        runs.append(picks)
    assert runs[0] == runs[1]


def test_profile_override_and_unknown_profile() -> None:
    text = config_with(single([("queue-scorer", 1.0)]))
    cfg = parse_config(text)
    extra = dataclasses.replace(cfg.profiles[0], name="other")
    s = Scheduler(dataclasses.replace(cfg, profiles=(*cfg.profiles, extra)), seed=1)
    assert s.schedule(req("q"), profile="other").profile == "other"
    with pytest.raises(RequestError) as e:
        s.schedule(req("q"), profile="nope")
    assert e.value.status == 400


def test_registry_replace_all_keeps_state_of_staying_pods() -> None:
    reg = PodRegistry()
    reg.upsert(Pod("10.0.0.1:8000"))
    reg.upsert(Pod("10.0.0.2:8000"))
    reg["10.0.0.1:8000"].inflight_requests = 3
    removed: list[str] = []
    reg.on_remove(removed.append)
    reg.replace_all([Pod("10.0.0.1:8000", role=Role.DECODE), Pod("10.0.0.3:8000")])
    assert reg["10.0.0.1:8000"].inflight_requests == 3
    assert reg["10.0.0.1:8000"].role is Role.DECODE
    assert removed == ["10.0.0.2:8000"]


# ------------------------------------------------------------ pending (speculative) entries
PRECISE = single([("precise-prefix-cache-scorer", 1.0)])


def precise_sched(extra: str = "", pods: int = 4) -> tuple[Scheduler, list[float]]:
    from router.index import BlockIndex

    now = [0.0]
    cfg = parse_config(config_with(PRECISE, pods=pods, extra=extra))
    return Scheduler(cfg, precise_index=BlockIndex(), seed=3, clock=lambda: now[0]), now


def token_req(ids: list[int]) -> RoutingRequest:
    return RoutingRequest(model="m", prompt="", token_ids=ids)


GROUP = list(range(10_000, 10_000 + 4096))


def test_burst_of_one_group_follows_the_first_pick_before_any_kv_event() -> None:
    s, _ = precise_sched()
    targets = set()
    for i in range(12):
        d = s.schedule(token_req(GROUP + [i] * 40))
        s.on_pick(d)
        targets.add(d.target)
    assert len(targets) == 1  # every later request saw the first one's pending prefix


def test_without_pending_entries_a_burst_scatters() -> None:
    s, _ = precise_sched(extra="prefix_index: {pending_ttl_s: null}")
    targets = set()
    for i in range(12):
        d = s.schedule(token_req(GROUP + [i] * 40))
        s.on_pick(d)
        targets.add(d.target)
    assert len(targets) > 1
    assert s.precise_index.pending_count() == 0


def test_kv_events_confirm_pending_entries() -> None:
    from router.blocks import BlockConfig
    from router.events.ingest import KVEventIngester
    from router.events.types import BlockStored

    s, _ = precise_sched()
    ids = GROUP[:256]
    d = s.schedule(token_req(ids))
    s.on_pick(d)
    assert s.precise_index.pending_count(d.target) == 16
    ing = KVEventIngester(s.precise_index, BlockConfig(mode="tokens", block_size=16))
    stored = BlockStored(
        block_hashes=list(range(1, 17)), parent_block_hash=None, token_ids=ids, block_size=16
    )
    ing.apply_events(d.target, [stored])
    assert s.precise_index.pending_count() == 0
    assert s.precise_index.pod_block_count(d.target) == 16
    assert s.schedule(token_req(ids + [1] * 16)).target == d.target


def test_pending_entry_lives_until_first_token_plus_ttl_and_goes_on_failure() -> None:
    s, now = precise_sched(extra="prefix_index: {pending_ttl_s: 2.0, pending_max_s: 60.0}")
    a = s.schedule(token_req(GROUP))
    s.on_pick(a)
    now[0] = 29.0  # a long queue: still pending while the prefill has not run
    assert s.schedule(token_req(GROUP + [5] * 32)).target == a.target
    s.on_first_token(a)  # prefill done: the engine's events are due within 2 s
    now[0] = 30.5
    s.schedule(token_req([1] * 32))
    assert s.precise_index.pending_count() > 0
    now[0] = 31.0
    s.schedule(token_req([1] * 32))
    assert s.precise_index.pending_count() == 0
    b = s.schedule(token_req(GROUP))
    s.on_pick(b)
    s.on_failure(b, b.target)
    assert s.precise_index.pending_count() == 0


def test_pending_entries_expire_when_a_face_never_reports_back() -> None:
    s, now = precise_sched(extra="prefix_index: {pending_max_s: 5.0}")
    s.on_pick(s.schedule(token_req(GROUP)))
    now[0] = 5.0
    s.schedule(token_req([1] * 32))
    assert s.precise_index.pending_count() == 0


def test_pd_records_pending_on_both_prefill_and_decode_pods() -> None:
    from router.index import BlockIndex

    pd = PD.replace("THRESHOLD", "0").replace("prefix-cache-scorer", "precise-prefix-cache-scorer")
    cfg = parse_config(BASE + pd)
    s = Scheduler(cfg, precise_index=BlockIndex(), seed=1, clock=lambda: 0.0)
    d = s.schedule(token_req(GROUP))
    s.on_pick(d)
    assert d.prefill is not None and d.prefill != d.target
    assert s.precise_index.pending_count(d.prefill) == len(GROUP) // 16
    assert s.precise_index.pending_count(d.target) == len(GROUP) // 16
    s.on_prefill_done(d)
    s.on_failure(d, d.target)
    assert s.precise_index.pending_count(d.target) == 0


def test_explain_carries_scorer_details_beside_the_old_keys() -> None:
    s = make(config_with(single([("predicted-ttft-scorer", 1.0), ("queue-scorer", 1.0)])))
    data = s.schedule(req(PROMPT)).explain()
    for pod in data["pods"]:
        assert set(pod) == {"endpoint", "prefix_hit", "scores", "total", "details"}
        parts = pod["details"]["predicted-ttft-scorer"]
        assert parts["predicted_ttft_s"] == pytest.approx(
            parts["queued_prefill_s"]
            + parts["own_prefill_s"]
            + parts["decode_interference_s"]
            + parts["kv_pressure_s"],
            abs=1e-5,
        )
        assert "queue-scorer" not in pod["details"]
