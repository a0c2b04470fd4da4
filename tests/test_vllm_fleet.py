"""benchmarks/vllm_fleet.py's pure parts: which turns of a workload fit the real pods' context,
and when a real-pod run counts as valid (the runs themselves need real vLLM pods: see the
README's figures of `compare.py --fleet vllm-cpu`)."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare
import vllm_fleet

from router.sim.workloads import make_workload


def test_fleet_flag_selects_real_pods_and_skips_the_overhead_run() -> None:
    args = compare.parse_args(["--fleet", "vllm-cpu", "--no-pin"])
    assert args.fleet == "vllm-cpu" and args.no_overhead
    assert compare.parse_args(["--no-pin"]).fleet == "emulator"


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), max_tokens=st.sampled_from([1, 32, 512]))
def test_fitted_workload_keeps_whole_session_prefixes_that_fit(seed: int, max_tokens: int) -> None:
    w = make_workload("multi-turn", num_requests=60, seed=seed)
    fitted = vllm_fleet.fit_workload(w, max_tokens)
    budget = (vllm_fleet.MAX_MODEL_LEN - max_tokens) / vllm_fleet.TOKENS_PER_WORKLOAD_TOKEN
    assert all(len(a.token_ids) <= budget for a in fitted.arrivals)
    assert [a.index for a in fitted.arrivals] == list(range(len(fitted.arrivals)))
    by_session: dict[str, list[int]] = {}
    for a in w.arrivals:
        by_session.setdefault(a.session, []).append(len(a.token_ids))
    kept: dict[str, int] = {}
    for a in fitted.arrivals:
        if a.prev < 0:
            assert a.session not in kept  # a session starts once
        else:  # `prev` is the kept previous turn of the same session
            prev = fitted.arrivals[a.prev]
            assert prev.session == a.session and prev.index < a.index
        kept[a.session] = kept.get(a.session, 0) + 1
    for session, lengths in by_session.items():
        # Kept: every turn up to the first that does not fit, none after it.
        fit = next((i for i, n in enumerate(lengths) if n > budget), len(lengths))
        assert kept.get(session, 0) == fit


def test_a_real_pod_run_is_judged_on_the_load_generators_lag_alone() -> None:
    row = {"send_lag_p99_ms": 0.8, "loop_lag_p99_ms": 1.5, "step_lag_p99_ms": None}
    vllm_fleet.mark_cpu_run(row, 2.0)
    assert row["valid"] and row["lag_p99_ms"] == 1.5 and row["fleet"] == "vllm-cpu"
    row = {"send_lag_p99_ms": 300.0, "loop_lag_p99_ms": 1.0, "step_lag_p99_ms": None}
    vllm_fleet.mark_cpu_run(row, 2.0)
    assert not row["valid"] and row["lag_p99_ms"] == 300.0
