"""The reuse ledger: decisions add prompt / available / captured, the engine's scraped hit
fraction or its responses add delivered (never both for one pod, always in the router's prompt
tokens), and the collector exports the four families with the contract's labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.reuse import ReuseCollector, ReuseLedger

A, B = "10.0.0.1:8000", "10.0.0.2:8000"


def _usage(cached: int | None, prompt: int = 100) -> dict[str, object]:
    usage: dict[str, object] = {"prompt_tokens": prompt, "completion_tokens": 4}
    usage["prompt_tokens_details"] = None if cached is None else {"cached_tokens": cached}
    return usage


def test_decisions_add_the_prompt_and_the_two_routing_figures() -> None:
    ledger = ReuseLedger()
    ledger.on_decision("m", A, 100, available=80, captured=80)
    ledger.on_decision("m", B, 100, available=80, captured=0)
    c = ledger.counts()
    assert (c[("m", A)].prompt, c[("m", A)].available, c[("m", A)].captured) == (100, 80, 80)
    assert (c[("m", B)].prompt, c[("m", B)].captured) == (100, 0)
    assert ledger.available_by_model() == {"m": 160}
    report = ledger.report()["models"]["m"]
    assert report["rates"] == {"available": 0.8, "captured": 0.4, "delivered": 0.0}
    assert report["gaps"]["routing_tokens"] == 80
    assert report["pods"][B]["gaps"]["routing"] == 0.8


def test_scrapes_apply_the_engines_hit_fraction_to_the_routers_prompt_tokens() -> None:
    """The engine counts ~2.7 of its tokens per router token here: delivered stays in router
    tokens, so it can never exceed the prompt."""
    ledger = ReuseLedger()
    ledger.on_engine_counters(A, 500.0, 1000.0)  # the baseline: before the router counted
    ledger.on_decision("m", A, 100, 64, 64)
    ledger.on_engine_counters(A, 500.0, 1000.0)  # not scheduled yet: the prompt waits
    assert ledger.counts()[("m", A)].delivered == 0
    ledger.on_engine_counters(A, 500.0 + 172.8, 1000.0 + 270.0)  # 64% of its tokens hit
    assert ledger.counts()[("m", A)].delivered == 64
    ledger.on_decision("m", A, 100, 64, 64)
    ledger.on_engine_counters(A, 27.0, 270.0)  # smaller: a restarted engine counting from 0
    assert ledger.counts()[("m", A)].delivered == 74
    ledger.on_engine_counters(A, None, None)  # a page without the counters changes nothing
    ledger.on_engine_counters(A, 900.0, 900.0)  # growth with nothing routed since: nothing
    assert ledger.counts()[("m", A)].delivered == 74
    assert ledger.delivered_source(A) == "scrapes"


def test_once_a_response_carries_cached_tokens_the_pod_is_counted_from_responses_only() -> None:
    ledger = ReuseLedger()
    ledger.on_engine_counters(A, 0.0, 0.0)
    ledger.on_decision("m", A, 100, 64, 64)
    ledger.on_usage("m", A, _usage(None), 100)  # no details: the scrapes count
    ledger.on_engine_counters(A, 64.0, 100.0)
    assert ledger.counts()[("m", A)].delivered == 64
    # The first response with details switches the pod; it adds only what the scrapes have
    # not counted since the pod's last pick.
    ledger.on_decision("m", A, 100, 64, 64)
    ledger.on_engine_counters(A, 104.0, 200.0)  # 40 of this request's 64 hits already scraped
    ledger.on_usage("m", A, _usage(64), 100)
    assert ledger.delivered_source(A) == "responses"
    assert ledger.counts()[("m", A)].delivered == 128
    ledger.on_engine_counters(A, 300.0, 400.0)  # ignored from now on
    # Engine tokens are scaled to the router's: 96 of the engine's 200 → 48 of the router's 100.
    ledger.on_usage("m", A, _usage(96, prompt=200), 100)
    ledger.on_usage("m", A, _usage(None), 100)  # vLLM leaves the details out when nothing hit
    assert ledger.counts()[("m", A)].delivered == 176
    # The other pod keeps its own source.
    ledger.on_engine_counters(B, 0.0, 0.0)
    ledger.on_decision("m", B, 50, 0, 0)
    ledger.on_engine_counters(B, 10.0, 50.0)
    assert ledger.counts()[("m", B)].delivered == 10
    assert ledger.report()["models"]["m"]["pods"][B]["delivered_source"] == "scrapes"


def test_the_collector_exports_the_four_families_with_the_contract_labels() -> None:
    ledger = ReuseLedger()
    ledger.on_engine_counters(A, 0.0, 0.0)
    ledger.on_decision("m", A, 100, 80, 48)
    ledger.on_engine_counters(A, 40.0, 100.0)
    registry = CollectorRegistry()
    registry.register(ReuseCollector(ledger))
    page = generate_latest(registry).decode()
    samples = {
        s.name: (s.labels, s.value)
        for f in text_string_to_metric_families(page)
        for s in f.samples
        if s.name.endswith("_total")
    }
    pod = {"model": "m", "pod": A}
    assert samples == {
        "kvroute_prompt_tokens_total": (pod, 100.0),
        "kvroute_prefix_tokens_available_total": ({"model": "m"}, 80.0),
        "kvroute_prefix_tokens_captured_total": (pod, 48.0),
        "kvroute_prefix_tokens_delivered_total": (pod, 40.0),
    }
