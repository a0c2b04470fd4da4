"""Fuzzing the Prometheus text parse of a pod's `/metrics` page (`router.scrape`).

Inputs: random text, garbage lines mixed into a real vLLM page, NaN/±Inf/huge/negative values
for every gauge kvroute reads, odd labels (a non-numeric `block_size`), missing metrics. The
parse returns a snapshot with counts ≥ 0 and KV usage in [0, 1], or raises `MetricsParseError`
(the scraper counts it as a failed scrape); no other exception.
"""

from __future__ import annotations

import math

import httpx
import pytest
from aiohttp import web
from hypothesis import event, example, given
from hypothesis import strategies as st

from router.pods import Pod, PodRegistry
from router.scrape import MetricsParseError, MetricsScraper, ScrapeSettings, parse_vllm_metrics
from tests.fuzz.conftest import FUZZ, assert_no_crash_logged

NAMES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "process_start_time_seconds",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
]
value = st.one_of(
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e308", "1e400", "-3", "0", "2.5", "x", ""]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
)
labels = st.one_of(
    st.just(""),
    st.just('{model_name="m",engine="0"}'),
    st.text(max_size=20).map(lambda t: "{" + t + "}"),
)
sample_line = st.builds(lambda n, lab, v: f"{n}{lab} {v}", st.sampled_from(NAMES), labels, value)
cache_line = st.builds(
    lambda bs, v: f'vllm:cache_config_info{{block_size="{bs}",num_gpu_blocks="1"}} {v}',
    st.one_of(
        st.sampled_from(["16", "0", "-16", "x", "", "1e3", "99999999999999999999"]),
        st.text(max_size=5),
    ),
    value,
)
lora_line = st.builds(
    lambda run, v: (
        f'vllm:lora_requests_info{{running_lora_adapters="{run}",waiting_lora_adapters=""}} {v}'
    ),
    st.text(alphabet="ab,", max_size=6),
    value,
)
type_line = st.builds(
    lambda n, t: f"# TYPE {n} {t}",
    st.sampled_from(NAMES),
    st.sampled_from(["gauge", "counter", "junk", ""]),
)
garbage = st.text(max_size=60)
page = st.lists(st.one_of(sample_line, cache_line, lora_line, type_line, garbage), max_size=12).map(
    "\n".join
)


def check(text: str) -> None:
    try:
        snap = parse_vllm_metrics(text, "m", now=1.0)
    except MetricsParseError as e:
        event("parse error (a failed scrape)")
        assert str(e)
        return
    event("snapshot")
    assert snap.waiting >= 0 and snap.running >= 0
    assert 0.0 <= snap.kv_utilization <= 1.0
    assert snap.block_size is None or snap.block_size > 0
    for v in (snap.process_start_time, snap.prefix_cache_queries, snap.prefix_cache_hits):
        assert v is None or math.isfinite(v)


@FUZZ
@given(text=page)
@example(text="vllm:num_requests_running NaN")
@example(text="vllm:num_requests_running +Inf\nvllm:num_requests_waiting -Inf")
@example(text="vllm:num_requests_running -3\nvllm:kv_cache_usage_perc NaN")
@example(text='vllm:num_requests_running 1\nvllm:cache_config_info{block_size="x"} 1')
@example(text='vllm:num_requests_running 1\nvllm:cache_config_info{block_size="0"} 1')
@example(text="vllm:num_requests_running 1\nprocess_start_time_seconds NaN")
@example(text="vllm:num_requests_running 1\nvllm:prefix_cache_hits_total +Inf")
def test_metrics_pages_give_a_sane_snapshot_or_a_parse_error(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    check(text)
    assert_no_crash_logged(caplog)


@FUZZ
@given(text=st.text(max_size=400))
def test_random_text_gives_a_sane_snapshot_or_a_parse_error(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    check(text)
    assert_no_crash_logged(caplog)


# --- regressions of what the fuzzing found (each raised out of the parse before the fix) -----


@pytest.mark.parametrize(
    "text",
    [
        "vllm:num_requests_running NaN",
        "vllm:num_requests_running +Inf\nvllm:num_requests_waiting 1",
    ],
)
def test_non_finite_load_values_are_skipped_not_a_crash(text: str) -> None:
    if "waiting" in text:
        snap = parse_vllm_metrics(text, now=1.0)
        assert (snap.running, snap.waiting) == (0, 1)
    else:  # nothing usable left: a parse error the scraper counts
        with pytest.raises(MetricsParseError):
            parse_vllm_metrics(text, now=1.0)


def test_counts_whose_sum_overflows_are_held_to_a_bound() -> None:
    text = "vllm:num_requests_running 1e308\nvllm:num_requests_running 1e308"
    assert parse_vllm_metrics(text, now=1.0).running == 10**9


def test_negative_counts_are_clamped_to_zero() -> None:
    snap = parse_vllm_metrics("vllm:num_requests_running -3\nvllm:num_requests_waiting -1", now=1.0)
    assert (snap.running, snap.waiting) == (0, 0)


@pytest.mark.parametrize("bad", ["x", "0", "-16", "²"])
def test_a_bad_block_size_label_leaves_block_size_unknown_and_keeps_the_page(bad: str) -> None:
    text = f'vllm:num_requests_running 2\nvllm:cache_config_info{{block_size="{bad}"}} 1'
    snap = parse_vllm_metrics(text, now=1.0)
    assert snap.running == 2 and snap.block_size is None


def test_non_finite_start_time_and_counters_are_left_unknown() -> None:
    text = (
        "vllm:num_requests_running 1\nprocess_start_time_seconds NaN\n"
        "vllm:prefix_cache_hits_total +Inf\nvllm:prefix_cache_queries_total 10"
    )
    snap = parse_vllm_metrics(text, now=1.0)
    assert snap.process_start_time is None and snap.prefix_cache_hits is None
    assert snap.prefix_cache_queries == 10


async def test_scraper_counts_a_nan_page_as_a_failed_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before the fix, int(NaN) escaped the scrape task: the pod was neither failed nor
    refreshed, and asyncio logged 'Task exception was never retrieved'."""

    async def nan_page(_request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running NaN\n")

    app = web.Application()
    app.router.add_get("/metrics", nan_page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    registry = PodRegistry()
    registry.upsert(Pod(endpoint=f"127.0.0.1:{port}"))
    scraper = MetricsScraper(registry, ScrapeSettings(unhealthy_after=2))
    try:
        await scraper.scrape_once()
        await scraper.scrape_once()
    finally:
        await scraper.stop()
        await runner.cleanup()
    assert scraper.stats.parse_errors == 2 and scraper.stats.failures == 2
    assert not registry[f"127.0.0.1:{port}"].healthy
    assert_no_crash_logged(caplog)


class _AnyioRaceTransport(httpx.AsyncBaseTransport):
    """Raises what httpcore/anyio raised in a chaos run when a pod's socket was reset right
    after accept (`'NoneType' object has no attribute 'getpeername'`); the race itself is not
    reproducible on demand, so the exception is replayed at the transport boundary."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise AttributeError("'NoneType' object has no attribute 'getpeername'")


async def test_a_client_library_error_is_a_failed_scrape_not_a_lost_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = PodRegistry()
    registry.upsert(Pod(endpoint="127.0.0.1:9"))
    client = httpx.AsyncClient(transport=_AnyioRaceTransport())
    scraper = MetricsScraper(registry, ScrapeSettings(unhealthy_after=2), client=client)
    try:
        await scraper.scrape_once()
        await scraper.scrape_once()
    finally:
        await scraper.stop()
        await client.aclose()
    assert scraper.stats.failures == 2
    assert not registry["127.0.0.1:9"].healthy
    assert_no_crash_logged(caplog)
