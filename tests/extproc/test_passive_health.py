"""PassiveHealth: ejection on the failures the picker sees, readmission after a good scrape."""

from __future__ import annotations

import pytest

from envoy_extproc.passive_health import PassiveHealth
from envoy_extproc.settings import ExtProcSettings
from router.outlier import OutlierPolicy
from router.pods import MetricsSnapshot, Pod, PodRegistry

A, B = "10.0.0.1:8000", "10.0.0.2:8000"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make() -> tuple[PassiveHealth, PodRegistry, Clock]:
    registry = PodRegistry()
    for ep in (A, B):
        registry.upsert(Pod(ep))
    clock = Clock()
    policy = OutlierPolicy(consecutive_5xx=3, base_ejection_s=10.0)
    return PassiveHealth(registry, policy, clock), registry, clock


def test_unreachable_pod_is_ejected_at_once_and_back_only_after_time_and_a_good_scrape() -> None:
    health, registry, clock = make()
    ej = health.record_failure(A, 503, "r1", unreachable=True)
    assert ej is not None
    assert not registry[A].healthy and registry[B].healthy
    clock.t += 11  # ejection over, but no scrape since: still dead as far as we know
    assert health.tick() == []
    assert not registry[A].healthy
    registry.set_metrics(A, MetricsSnapshot(taken_at=clock.t - 20))  # before the ejection
    assert health.tick() == []
    registry.set_metrics(A, MetricsSnapshot(taken_at=clock.t))
    assert health.tick() == [A]
    assert registry[A].healthy
    assert A not in health.ejected


def test_a_pods_own_5xx_eject_only_after_distinct_requests_in_a_row() -> None:
    health, registry, _ = make()
    for _ in range(5):
        assert health.record_failure(A, 500, "same-request", unreachable=False) is None
    assert registry[A].healthy
    health.record_failure(A, 500, "r2", unreachable=False)
    health.record_success(A)  # a success breaks the streak
    health.record_failure(A, 500, "r3", unreachable=False)
    health.record_failure(A, 500, "r4", unreachable=False)
    assert registry[A].healthy
    assert health.record_failure(A, 502, "r5", unreachable=False) is not None
    assert not registry[A].healthy


@pytest.mark.parametrize("status", [0, 400, 404, 429])
def test_client_side_outcomes_say_nothing_about_the_pod(status: int) -> None:
    health, registry, _ = make()
    for i in range(10):
        assert health.record_failure(A, status, f"r{i}", unreachable=False) is None
    assert registry[A].healthy
    assert not health.ejected


def test_a_pod_removed_from_the_fleet_is_forgotten() -> None:
    health, registry, clock = make()
    health.record_failure(A, 503, "r1", unreachable=True)
    registry.remove(A)
    clock.t += 11
    assert health.tick() == []
    assert A not in health.ejected


def test_bad_outlier_settings_name_the_extproc_field() -> None:
    with pytest.raises(ValueError, match=r"extproc\.outlier_consecutive_5xx must be >= 1"):
        ExtProcSettings(outlier_consecutive_5xx=0)
    with pytest.raises(ValueError, match=r"extproc\.lame_duck_s must be >= 0"):
        ExtProcSettings(lame_duck_s=-1)
