"""`router.outlier`: ejection policy on an injected clock (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.outlier import Outcome, OutlierDetector, OutlierPolicy

POLICY = OutlierPolicy(consecutive_5xx=3, base_ejection_s=10.0, max_ejection_s=35.0)


def detector(pods: int = 4, policy: OutlierPolicy = POLICY) -> OutlierDetector:
    d = OutlierDetector(policy, clock=lambda: 0.0)
    d.set_fleet(f"p{i}" for i in range(pods))
    return d


def test_one_request_failing_everywhere_ejects_nothing() -> None:
    d = detector()
    for _ in range(10):
        for pod in ("p0", "p1", "p2", "p3"):
            assert d.record_5xx(pod, "poison", now=1.0) is None
    assert d.ejected(now=1.0) == frozenset()


def test_consecutive_5xx_of_distinct_requests_eject() -> None:
    d = detector()
    assert d.record_5xx("p0", "a", now=1.0) is None
    assert d.record_5xx("p0", "b", now=1.0) is None
    ej = d.record_5xx("p0", "c", now=2.0)
    assert ej is not None and ej.reason is Outcome.HTTP_5XX and ej.until == 12.0
    assert d.is_ejected("p0", now=11.9)
    assert not d.is_ejected("p0", now=12.0)


def test_a_success_resets_the_5xx_streak() -> None:
    d = detector()
    d.record_5xx("p0", "a", now=1.0)
    d.record_5xx("p0", "b", now=1.0)
    d.record_success("p0", now=1.0)
    d.record_5xx("p0", "c", now=1.0)
    d.record_5xx("p0", "d", now=1.0)
    assert not d.is_ejected("p0", now=1.0)


def test_connect_failure_ejects_at_once_and_is_not_capped() -> None:
    d = detector(pods=2)
    for pod in ("p0", "p1"):
        ej = d.record_connect_failure(pod, now=1.0)
        assert ej is not None and ej.reason is Outcome.CONNECT_FAILURE
    assert d.ejected(now=1.0) == {"p0", "p1"}


def test_max_ejection_percent_caps_5xx_ejections() -> None:
    d = detector(pods=4)  # 50% of 4 = 2
    for pod in ("p0", "p1", "p2"):
        for rid in "abc":
            d.record(pod, Outcome.HTTP_5XX, rid, now=1.0)
    assert d.ejected(now=1.0) == {"p0", "p1"}
    # Once room frees up, the pod whose streak stands is ejected by its next failure.
    d.readmit("p0", now=2.0)
    assert d.record_5xx("p2", "d", now=2.0) is not None
    assert d.ejected(now=2.0) == {"p1", "p2"}


def test_one_pod_may_always_be_ejected_even_at_zero_percent() -> None:
    d = detector(pods=2, policy=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=0))
    assert d.record_5xx("p0", "a", now=0.0) is not None
    assert d.record_5xx("p1", "b", now=0.0) is None


def test_ejection_grows_with_repeats_up_to_the_cap() -> None:
    d = detector()
    lengths = []
    t = 0.0
    for _ in range(5):
        ej = d.record_connect_failure("p0", now=t)
        assert ej is not None
        lengths.append(ej.until - ej.at)
        t = ej.until  # fails again the moment it is back
    assert lengths == [10.0, 20.0, 30.0, 35.0, 35.0]


def test_a_calm_pod_is_forgiven() -> None:
    d = detector()
    first = d.record_connect_failure("p0", now=0.0)
    assert first is not None and first.count == 1
    again = d.record_connect_failure("p0", now=10.0)
    assert again is not None and again.count == 2
    # Back at 30; calm for 2 x base_ejection_s: the multiplier falls back to 0.
    d.record_success("p0", now=55.0)
    later = d.record_connect_failure("p0", now=55.0)
    assert later is not None and later.count == 1


def test_readmit_ends_an_ejection_early() -> None:
    d = detector()
    d.record_connect_failure("p1", now=0.0)
    assert d.readmit("p1", now=1.0)
    assert not d.is_ejected("p1", now=1.0)
    assert not d.readmit("p1", now=1.0)


def test_least_recently_ejected_is_the_one_to_try() -> None:
    d = detector(pods=3)
    d.record_connect_failure("p2", now=1.0)
    d.record_connect_failure("p0", now=2.0)
    d.record_connect_failure("p1", now=3.0)
    assert d.least_recently_ejected(now=4.0) == "p2"
    assert d.least_recently_ejected(["p0", "p1"], now=4.0) == "p0"
    assert d.least_recently_ejected(["nope"], now=4.0) is None


def test_set_fleet_forgets_pods_that_left() -> None:
    d = detector(pods=2)
    d.record_connect_failure("p1", now=0.0)
    d.set_fleet(["p0"])
    assert d.ejected(now=0.0) == frozenset()


def test_policy_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"outlier\.consecutive_5xx"):
        OutlierPolicy(consecutive_5xx=0)
    with pytest.raises(ValueError, match=r"outlier\.max_ejection_percent"):
        OutlierPolicy(max_ejection_percent=150)
    with pytest.raises(ValueError, match="max_ejection_s"):
        OutlierPolicy(base_ejection_s=10, max_ejection_s=5)
    with pytest.raises(ValueError, match="request id"):
        OutlierDetector().record("p", Outcome.HTTP_5XX)


_events = st.lists(
    st.tuples(
        st.sampled_from(["p0", "p1", "p2", "p3", "p4"]),
        st.sampled_from(list(Outcome)),
        st.sampled_from(["r0", "r1", "r2", "r3", "r4", "r5"]),
        st.floats(min_value=0.0, max_value=50.0),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(_events, st.integers(min_value=1, max_value=4), st.sampled_from([0.0, 20.0, 50.0, 100.0]))
def test_invariants_under_any_sequence(events: list, threshold: int, pct: float) -> None:
    """A model of the streaks beside the detector: no ejection before `threshold` distinct
    failing requests, never more 5xx ejections than the cap, no ejection longer than
    `max_ejection_s`, and the pod to try when all are out is always an ejected one."""
    policy = OutlierPolicy(consecutive_5xx=threshold, max_ejection_percent=pct)
    pods = ["p0", "p1", "p2", "p3", "p4"]
    d = OutlierDetector(policy, clock=lambda: 0.0)
    d.set_fleet(pods)
    cap = max(1, int(len(pods) * pct / 100))
    streak: dict[str, set[str]] = {p: set() for p in pods}
    until: dict[str, float] = {}
    t = 0.0
    for pod, outcome, rid, dt in events:
        t += dt
        for p in [p for p, u in until.items() if t >= u]:
            del until[p]
            streak[p] = set()
        was_out = pod in until
        assert d.is_ejected(pod, now=t) == was_out
        ej = d.record(pod, outcome, rid, now=t)
        if outcome is Outcome.SUCCESS:
            streak[pod] = set()
        elif outcome is Outcome.HTTP_5XX:
            streak[pod].add(rid)
        if ej is not None:
            assert not was_out and ej.reason is outcome
            if outcome is Outcome.HTTP_5XX:
                assert len(streak[pod]) >= threshold
            until[pod] = ej.until
        out = d.ejected(now=t)
        assert out == set(until)
        reasons = [d.ejection(p, now=t) for p in out]
        assert sum(1 for e in reasons if e is not None and e.reason is Outcome.HTTP_5XX) <= cap
        for e in reasons:
            assert e is not None and e.at <= t < e.until
            assert e.until - e.at <= policy.max_ejection_s
        lre = d.least_recently_ejected(now=t)
        assert (lre in out) if out else lre is None
