"""`kvroute_shadow_*` series, computed from the scheduler's `ShadowSet` when Prometheus
scrapes (both faces register the same collector; the hot path only adds to plain counters).

Per shadow policy (`policy` label): requests scored, picks agreeing with the live one,
prompt tokens and the cached prefix tokens its picks held (captured / prompt is the share of
prompt tokens the policy would have found cached), its predicted TTFT (sum and count),
refusals and the time spent scoring it. `kvroute_shadow_live_prefix_tokens_captured_total` is
the live policy's captured tokens over the same requests, the yardstick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from router.shadow import ShadowSet


class ShadowCollector(Collector):
    """Reads the shadow set through `source` at each scrape (a config reload may replace
    the scheduler); exports nothing while no shadow policy is configured."""

    def __init__(self, source: Callable[[], ShadowSet | None]) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        shadows = self._source()
        if shadows is None:
            return
        labels = ["policy"]
        requests = CounterMetricFamily(
            "kvroute_shadow_requests_total",
            "Live requests each shadow policy scored (it sent nothing)",
            labels=labels,
        )
        agree = CounterMetricFamily(
            "kvroute_shadow_pick_agreement_total",
            "Requests the shadow policy would have sent where the live policy did "
            "(same target, same prefill pod)",
            labels=labels,
        )
        prompt = CounterMetricFamily(
            "kvroute_shadow_prompt_tokens_total",
            "Prompt tokens of the requests the shadow policy scored",
            labels=labels,
        )
        captured = CounterMetricFamily(
            "kvroute_shadow_prefix_tokens_captured_total",
            "Prompt tokens the shadow policy's pick held as a cached prefix at decision time "
            "(the live default index)",
            labels=labels,
        )
        ttft = SummaryMetricFamily(
            "kvroute_shadow_predicted_ttft_seconds",
            "Predicted time to first token on the shadow policy's pick (its own "
            "predicted-ttft-scorer, else the live policy's prediction for that pod)",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "kvroute_shadow_errors_total",
            "Requests the shadow policy would have refused, by error code",
            labels=["policy", "code"],
        )
        cost = CounterMetricFamily(
            "kvroute_shadow_scheduling_seconds_total",
            "Time spent scheduling requests under the shadow policy (the hot-path cost)",
            labels=labels,
        )
        for sp in shadows.policies:
            s = sp.stats
            name = [sp.name]
            requests.add_metric(name, s.requests)
            agree.add_metric(name, s.agreements)
            prompt.add_metric(name, s.prompt_tokens)
            captured.add_metric(name, s.captured_tokens)
            ttft.add_metric(name, s.predicted_ttft_count, s.predicted_ttft_sum_s)
            cost.add_metric(name, s.seconds)
            for code, n in sorted(s.errors.items()):
                errors.add_metric([sp.name, code], n)
        yield requests
        yield agree
        yield prompt
        yield captured
        yield ttft
        yield errors
        yield cost
        yield CounterMetricFamily(
            "kvroute_shadow_live_prefix_tokens_captured_total",
            "Prompt tokens the live policy's pick held as a cached prefix, over the requests "
            "the shadow policies scored (their yardstick)",
            value=shadows.live_stats.captured_tokens,
        )
