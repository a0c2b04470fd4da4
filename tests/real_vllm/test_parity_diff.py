"""The parity diff itself (no pods): what it reports and what it lets through."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.real_vllm.parity import Row, dedupe, diff_json, diff_metrics, table, unexplained

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(json_values)
def test_a_value_never_differs_from_itself(value: Any) -> None:
    assert diff_json(value, value, "x") == []


@given(st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=2, max_size=5))
def test_reordered_keys_are_reported_once(d: dict[str, int]) -> None:
    flipped = dict(reversed(list(d.items())))
    rows = diff_json(d, flipped, "body")
    assert rows == [Row("body (key order)", ",".join(d), ",".join(flipped))]


def test_missing_extra_retyped_and_changed_fields_are_rows() -> None:
    vllm = {"a": 1, "b": None, "c": "x", "d": [1, 2]}
    emu = {"a": "1", "c": "y", "d": [1], "e": 0}
    rows = diff_json(vllm, emu, "s")
    assert Row("s.b", "null", "(absent)") in rows
    assert Row("s.e", "(absent)", "int") in rows
    assert Row("s.a", "int 1", "str '1'") in rows
    assert Row("s.c", "'x'", "'y'") in rows
    assert Row("s.d (length)", "2", "1") in rows


def test_volatile_fields_compare_by_type_only() -> None:
    a = {"id": "cmpl-1", "created": 1, "system_fingerprint": "vllm-0.32.0-abc"}
    b = {"id": "cmpl-2", "created": 2, "system_fingerprint": None}
    assert diff_json(a, b, "completion.body") == [
        Row("completion.body.system_fingerprint", "str", "null")
    ]


METRICS_VLLM = """# HELP vllm:x_total X.
# TYPE vllm:x_total counter
vllm:x_total{engine="0",model_name="m",reason="a"} 1.0
vllm:x_total{engine="0",model_name="m",reason="b"} 0.0
# HELP vllm:y Y.
# TYPE vllm:y gauge
vllm:y{engine="0",model_name="m"} 1.0
"""
METRICS_EMU = """# HELP vllm:x_total X.
# TYPE vllm:x_total counter
vllm:x_total{engine="0",model_name="m",reason="a"} 5.0
# HELP vllm:z Z.
# TYPE vllm:z gauge
vllm:z{model_name="m"} 1.0
"""


def test_metrics_diff_names_families_and_enumerated_label_values() -> None:
    rows = diff_metrics(METRICS_VLLM, METRICS_EMU)
    assert Row("metrics.vllm:x reason values", "a,b", "a") in rows
    assert Row("metrics.vllm:y", "gauge", "(absent)") in rows
    assert Row("metrics.vllm:z", "(absent)", "gauge") in rows
    assert len(rows) == 3  # sample values are not compared


def test_table_marks_known_differences_and_unexplained_drops_them() -> None:
    known = Row("metrics.vllm:iteration_tokens_total", "histogram", "(absent)")
    other = Row("chat.body.x", "null", "(absent)")
    rows = dedupe([known, other, other])
    assert rows == [known, other]
    assert unexplained(rows) == [other]
    text = table(rows)
    assert "| chat.body.x | null | (absent) |" in text and "(kept:" in text
