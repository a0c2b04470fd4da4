"""Fleet spec grammar."""

from __future__ import annotations

import pytest

from router.pods import Role
from router.sim.fleet import FleetSpecError, PodGroup, parse_fleet


def test_plain_count_is_that_many_both_pods() -> None:
    spec = parse_fleet("8")
    assert spec.groups == (PodGroup(8, Role.BOTH),)
    assert spec.pods == 8 and not spec.disaggregated


def test_shorthand_4p1d_is_four_prefill_and_one_decode() -> None:
    spec = parse_fleet("4p1d")
    assert spec.groups == (PodGroup(4, Role.PREFILL), PodGroup(1, Role.DECODE))
    assert spec.disaggregated


def test_groups_take_tp_and_profile_options_keeping_profile_case() -> None:
    spec = parse_fleet("4p:tp1, 1d:tp4:profile=My-Model")
    assert spec.groups == (
        PodGroup(4, Role.PREFILL, tp=1),
        PodGroup(1, Role.DECODE, tp=4, profile="My-Model"),
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("8x", "is not COUNT"),
        ("4:tpx", "unknown option"),
        ("4:profile=", "empty profile"),
        ("0", "no pods"),
        ("2b1p1d", "mixes 'both'"),
        ("4p", "needs both prefill and decode"),
        ("1d", "needs both prefill and decode"),
        ("4:tp0", "tp must be"),
    ],
)
def test_bad_specs_are_errors_naming_the_problem(text: str, reason: str) -> None:
    with pytest.raises(FleetSpecError, match=reason):
        parse_fleet(text)
