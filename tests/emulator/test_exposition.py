"""The pod's `/metrics` text equals what `prometheus_client.generate_latest` writes for the
same families and values (up to the `_created` timestamps, taken at different instants)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from router.emulator.exposition import CounterFamily, HistogramFamily, MetricsText
from router.emulator.runtime import PodRuntime
from router.emulator.settings import EmulatorSettings

_CREATED = re.compile(r"^(\S+_created(?:\{.*\})?) \S+$", re.MULTILINE)


def _same_text(ours: bytes, theirs: bytes) -> None:
    assert _CREATED.sub(r"\1 T", ours.decode()) == _CREATED.sub(r"\1 T", theirs.decode())


class _Gauges:
    def __init__(self, value: float) -> None:
        self.value = value

    def collect(self):
        g = GaugeMetricFamily("demo:running", "Running.\nNow", labels=["model_name"])
        g.add_metric(["m"], self.value)
        yield g


label_values = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)))
amounts = st.floats(min_value=0, max_value=1e7, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["count", "observe", "lag"]), label_values, amounts),
        max_size=30,
    ),
    doc=st.text(max_size=20),
    gauge=st.floats(allow_nan=False),
)
def test_same_text_as_prometheus_client_for_any_values(
    ops: list[tuple[str, str, float]], doc: str, gauge: float
) -> None:
    """Rendered after every write and once more with none between (the families keep their
    text between renders and must make it again after any change)."""
    reg = CollectorRegistry(auto_describe=False)
    ours = MetricsText()
    buckets = (0.001, 0.5, 1.0, 1e6)
    reg.register(_Gauges(gauge))
    ours.add(_Gauges(gauge))
    pc = Counter("demo:requests", doc or "d", ["model_name", "engine"], registry=reg)
    oc = CounterFamily("demo:requests", doc or "d", ("model_name", "engine"))
    ph = Histogram("demo:seconds", "h\\x", ["model_name"], registry=reg, buckets=buckets)
    oh = HistogramFamily("demo:seconds", "h\\x", ("model_name",), buckets)
    pl = Histogram("demo_lag", "lag", registry=reg, buckets=(0.1, 1.0))
    ol = HistogramFamily("demo_lag", "lag", (), (0.1, 1.0))
    pu = Counter("demo_pulls", "unlabelled", registry=reg)
    ou = CounterFamily("demo_pulls", "unlabelled")
    for family in (oc, oh, ol, ou):
        ours.add(family)
    for op, label, x in ops:
        if op == "count":
            pc.labels(label, "0").inc(x)
            oc.labels(label, "0").inc(x)
            pu.inc()
            ou.inc()
        elif op == "observe":
            ph.labels(label).observe(x)
            oh.labels(label).observe(x)
        else:
            pl.observe(x / 1e7)
            ol.labels().observe(x / 1e7)
        _same_text(ours.render(), generate_latest(reg))
    _same_text(ours.render(), generate_latest(reg))
    _same_text(ours.render(), generate_latest(reg))


def test_pod_metrics_text_parses_and_counts_what_happened() -> None:
    rt = PodRuntime(EmulatorSettings())
    for i in range(30):
        rt.metrics.step_lag(0.0007 * i)
    rt.metrics.faults.labels("stall").inc()
    rt.metrics.kv_pulls.inc()
    body = rt.metrics.render().decode()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    lag = {s.name: s.value for s in fams["kvroute_emulator_step_lag_seconds"].samples}
    assert lag["kvroute_emulator_step_lag_seconds_count"] == 30
    assert abs(lag["kvroute_emulator_step_lag_seconds_sum"] - 0.0007 * 435) < 1e-9
    faults = [s for s in fams["kvroute_emulator_faults_injected"].samples if s.name.endswith("l")]
    assert [(s.labels, s.value) for s in faults] == [({"kind": "stall"}, 1.0)]
    assert "vllm:num_requests_running" in fams
    assert "vllm:request_success" in fams  # one series per finish reason, zero
    assert len([s for s in fams["vllm:request_success"].samples if s.name.endswith("_total")]) == 5


def test_counters_refuse_to_go_down_and_labels_must_match() -> None:
    c = CounterFamily("demo", "d", ("a",))
    try:
        c.labels("x").inc(-1)
    except ValueError as e:
        assert "non-negative" in str(e)
    else:
        raise AssertionError("a negative increment was accepted")
    try:
        c.labels("x", "y")
    except ValueError as e:
        assert "expected labels" in str(e)
    else:
        raise AssertionError("wrong label count accepted")
