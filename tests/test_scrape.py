"""Metrics scraping: the parser on prometheus_client-generated pages, and the scraper against a
real HTTP server on 127.0.0.1 serving such pages (healthy, stalled, failing, garbage)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.pods import Pod, PodRegistry
from router.scrape import (
    MetricsParseError,
    MetricsScraper,
    ScrapeSettings,
    parse_vllm_metrics,
)

Engine = tuple[str, int, int, float]  # engine label, running, waiting, kv usage


def vllm_page(
    engines: Sequence[Engine] = (("0", 3, 1, 0.25), ("1", 2, 4, 0.75)),
    *,
    model: str = "llama",
    old_kv_name: bool = False,
    lora: Sequence[tuple[float, str, str]] = (),
    block_size: int | None = 16,
) -> str:
    """A /metrics page with vLLM's metric names, produced by prometheus_client itself."""
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    running = Gauge("vllm:num_requests_running", "Running requests.", labels, registry=reg)
    waiting = Gauge("vllm:num_requests_waiting", "Waiting requests.", labels, registry=reg)
    kv_name = "vllm:gpu_cache_usage_perc" if old_kv_name else "vllm:kv_cache_usage_perc"
    kv = Gauge(kv_name, "KV-cache usage, 1 = full.", labels, registry=reg)
    prompt = Counter("vllm:prompt_tokens", "Prefill tokens.", labels, registry=reg)
    ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT.", labels, registry=reg)
    for engine, run, wait, usage in engines:
        running.labels(model, engine).set(run)
        waiting.labels(model, engine).set(wait)
        kv.labels(model, engine).set(usage)
        prompt.labels(model, engine).inc(1234)
        ttft.labels(model, engine).observe(0.05)
    if lora:
        info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=reg,
        )
        for ts, run_csv, wait_csv in lora:
            info.labels("4", wait_csv, run_csv).set(ts)
    if block_size is not None:
        cache = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig.",
            ["block_size", "num_gpu_blocks", "enable_prefix_caching"],
            registry=reg,
        )
        cache.labels(str(block_size), "8192", "True").set(1)
    return generate_latest(reg).decode()


# --- parser ---------------------------------------------------------------------------------


def test_parse_sums_requests_over_engines_and_averages_kv_usage() -> None:
    snap = parse_vllm_metrics(vllm_page(), now=12.5)
    assert (snap.running, snap.waiting) == (5, 5)
    assert snap.kv_utilization == pytest.approx(0.5)
    assert snap.block_size == 16
    assert snap.taken_at == 12.5
    assert not snap.stale


def test_parse_reads_old_gpu_cache_usage_name() -> None:
    snap = parse_vllm_metrics(vllm_page([("0", 1, 0, 0.4)], old_kv_name=True), now=0.0)
    assert snap.kv_utilization == pytest.approx(0.4)


def test_parse_prefers_new_kv_name_when_both_are_present() -> None:
    page = vllm_page([("0", 1, 0, 0.9)]) + 'vllm:gpu_cache_usage_perc{engine="0"} 0.1\n'
    assert parse_vllm_metrics(page, now=0.0).kv_utilization == pytest.approx(0.9)


def test_parse_takes_lora_sample_with_latest_timestamp() -> None:
    page = vllm_page(
        lora=[(1000.0, "old-a", ""), (1002.0, "sql, chat", "math"), (1001.0, "old-b", "x")]
    )
    snap = parse_vllm_metrics(page, now=0.0)
    assert snap.running_adapters == frozenset({"sql", "chat"})
    assert snap.waiting_adapters == frozenset({"math"})


def test_parse_filters_by_model_name() -> None:
    page = vllm_page([("0", 3, 1, 0.2)], model="llama") + (
        'vllm:num_requests_running{engine="0",model_name="qwen"} 7.0\n'
    )
    assert parse_vllm_metrics(page, "qwen", now=0.0).running == 7
    assert parse_vllm_metrics(page, "llama", now=0.0).running == 3
    assert parse_vllm_metrics(page, now=0.0).running == 10
    with pytest.raises(MetricsParseError, match="for model 'mistral'"):
        parse_vllm_metrics(page, "mistral", now=0.0)


def test_parse_without_cache_config_leaves_block_size_unknown() -> None:
    snap = parse_vllm_metrics(vllm_page(block_size=None), now=0.0)
    assert snap.block_size is None and snap.num_gpu_blocks is None


def test_parse_sums_the_kv_capacity_over_engines() -> None:
    assert parse_vllm_metrics(vllm_page(), now=0.0).num_gpu_blocks == 8192
    # Two data-parallel engines each report their own cache: the pod holds both.
    page = vllm_page(block_size=None) + (
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0\n'
        'vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="1500"} 1.0\n'
        'vllm:cache_config_info{block_size="16",engine="2",num_gpu_blocks="None"} 1.0\n'
    )
    assert parse_vllm_metrics(page, now=0.0).num_gpu_blocks == 2500


@pytest.mark.parametrize(
    "text",
    [
        "<html><body>502 Bad Gateway</body></html>\n",
        'vllm:num_requests_running{engine="0"} lots\n',
        "",
        "# HELP process_cpu_seconds_total CPU.\n# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 1.5\n",
        "\x00\x01\xff garbage",
    ],
    ids=["html", "bad-value", "empty", "not-vllm", "binary"],
)
def test_parse_rejects_pages_that_are_not_vllm_metrics(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_vllm_metrics(text, now=0.0)


@given(
    st.lists(
        st.tuples(st.integers(0, 500), st.integers(0, 500), st.floats(0.0, 1.0)),
        min_size=1,
        max_size=8,
    )
)
def test_parse_totals_equal_sums_over_any_number_of_engines(
    values: list[tuple[int, int, float]],
) -> None:
    engines = [(str(i), run, wait, kv) for i, (run, wait, kv) in enumerate(values)]
    snap = parse_vllm_metrics(vllm_page(engines), now=1.0)
    assert snap.running == sum(v[0] for v in values)
    assert snap.waiting == sum(v[1] for v in values)
    assert snap.kv_utilization == pytest.approx(sum(v[2] for v in values) / len(values))


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        ScrapeSettings(timeout_s=0)
    with pytest.raises(ValueError):
        ScrapeSettings(unhealthy_after=0)
    with pytest.raises(ValueError):
        ScrapeSettings(metrics_path="metrics")


# --- scraper over real HTTP -----------------------------------------------------------------


class MetricsServer:
    """A pod's /metrics endpoint on 127.0.0.1 whose behaviour a test switches."""

    def __init__(self) -> None:
        self.page = vllm_page()
        self.mode = "ok"  # ok | stall | garbage | error
        self.hits = 0
        self.hit_times: list[float] = []  # loop time of each request's arrival
        self.endpoint = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.hit_times.append(asyncio.get_running_loop().time())
        if self.mode == "stall":
            await asyncio.sleep(30)
        if self.mode == "error":
            return web.Response(status=500, text="engine dead")
        if self.mode == "garbage":
            return web.Response(text="<html><body>not metrics</body></html>")
        return web.Response(text=self.page, content_type="text/plain")


@pytest.fixture
async def servers() -> AsyncIterator[list[MetricsServer]]:
    started = [MetricsServer(), MetricsServer()]
    for s in started:
        await s.start()
    yield started
    for s in started:
        await s.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fleet(*endpoints: str) -> PodRegistry:
    registry = PodRegistry()
    for ep in endpoints:
        registry.upsert(Pod(endpoint=ep))
    return registry


async def test_scrape_writes_snapshot_from_real_http_page(servers) -> None:
    server = servers[0]
    server.page = vllm_page(lora=[(5.0, "sql", "")], block_size=32)
    registry = fleet(server.endpoint)
    clock = FakeClock()
    scraper = MetricsScraper(registry, ScrapeSettings(), clock=clock)
    try:
        await scraper.scrape_once()
    finally:
        await scraper.stop()
    snap = registry[server.endpoint].metrics
    assert (snap.running, snap.waiting, snap.block_size) == (5, 5, 32)
    assert snap.kv_utilization == pytest.approx(0.5)
    assert snap.running_adapters == frozenset({"sql"})
    assert snap.taken_at == 100.0 and not snap.stale
    assert scraper.stats.scrapes_ok == 1


async def test_scrape_reads_old_metric_names_over_http(servers) -> None:
    server = servers[0]
    server.page = vllm_page([("0", 2, 9, 0.3)], old_kv_name=True)
    registry = fleet(server.endpoint)
    scraper = MetricsScraper(registry)
    try:
        await scraper.scrape_once()
    finally:
        await scraper.stop()
    snap = registry[server.endpoint].metrics
    assert (snap.running, snap.waiting) == (2, 9)
    assert snap.kv_utilization == pytest.approx(0.3)


async def test_stalled_server_times_out_marks_stale_keeps_values_and_recovers(servers) -> None:
    server = servers[0]
    registry = fleet(server.endpoint)
    clock = FakeClock()
    scraper = MetricsScraper(registry, ScrapeSettings(timeout_s=0.2), clock=clock)
    try:
        await scraper.scrape_once()
        server.mode = "stall"
        clock.now = 101.0
        await scraper.scrape_once()
        snap = registry[server.endpoint].metrics
        assert snap.stale
        assert (snap.running, snap.waiting, snap.taken_at) == (5, 5, 100.0)
        assert snap.age(clock.now) == pytest.approx(1.0)
        assert scraper.stats.timeouts == 1
        assert registry[server.endpoint].healthy

        server.mode = "ok"
        server.page = vllm_page([("0", 1, 0, 0.1)])
        clock.now = 102.0
        await scraper.scrape_once()
        snap = registry[server.endpoint].metrics
        assert not snap.stale and snap.taken_at == 102.0 and snap.running == 1
    finally:
        await scraper.stop()


async def test_consecutive_failures_mark_unhealthy_until_a_scrape_succeeds(servers) -> None:
    server = servers[0]
    registry = fleet(server.endpoint)
    scraper = MetricsScraper(registry, ScrapeSettings(unhealthy_after=3))
    try:
        server.mode = "error"
        await scraper.scrape_once()
        await scraper.scrape_once()
        assert registry[server.endpoint].healthy
        await scraper.scrape_once()
        assert not registry[server.endpoint].healthy
        await scraper.scrape_once()
        assert not registry[server.endpoint].healthy
        assert scraper.stats.marked_unhealthy == 1

        server.mode = "ok"
        await scraper.scrape_once()
        assert registry[server.endpoint].healthy
        assert scraper.stats.recovered == 1
        # The failure count restarts: two new failures do not trip it again.
        server.mode = "error"
        await scraper.scrape_once()
        await scraper.scrape_once()
        assert registry[server.endpoint].healthy
    finally:
        await scraper.stop()


async def test_garbage_page_counts_a_parse_error_and_keeps_values_stale(servers) -> None:
    server = servers[0]
    registry = fleet(server.endpoint)
    scraper = MetricsScraper(registry)
    try:
        await scraper.scrape_once()
        server.mode = "garbage"
        await scraper.scrape_once()
    finally:
        await scraper.stop()
    snap = registry[server.endpoint].metrics
    assert snap.stale and snap.running == 5
    assert scraper.stats.parse_errors == 1


async def test_refused_connection_counts_as_failure(servers) -> None:
    server = servers[0]
    endpoint = server.endpoint
    await server.stop()  # nothing listens on that port now
    registry = fleet(endpoint)
    scraper = MetricsScraper(registry, ScrapeSettings(unhealthy_after=1))
    try:
        await scraper.scrape_once()
    finally:
        await scraper.stop()
    assert scraper.stats.failures == 1
    assert registry[endpoint].metrics.stale and registry[endpoint].metrics.taken_at is None
    assert not registry[endpoint].healthy


async def test_success_does_not_revive_pod_marked_unhealthy_elsewhere(servers) -> None:
    server = servers[0]
    registry = fleet(server.endpoint)
    registry.set_health(server.endpoint, False)
    scraper = MetricsScraper(registry)
    try:
        await scraper.scrape_once()
    finally:
        await scraper.stop()
    assert not registry[server.endpoint].healthy
    assert registry[server.endpoint].metrics.running == 5


async def test_loop_keeps_scraping_other_pods_while_one_stalls(servers) -> None:
    slow, fast = servers
    slow.mode = "stall"
    registry = fleet(slow.endpoint, fast.endpoint)
    scraper = MetricsScraper(
        registry, ScrapeSettings(interval_s=0.02, timeout_s=2.0, unhealthy_after=1)
    )
    await scraper.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await scraper.stop()
    assert slow.hits == 1  # its one scrape is still waiting; ticks skip it rather than pile up
    assert fast.hits >= 5
    assert registry[fast.endpoint].metrics.taken_at is not None
    assert registry[slow.endpoint].metrics.taken_at is None


async def test_a_round_spreads_its_pods_scrapes_over_the_interval() -> None:
    # Fired together, n pods' pages arrive and are parsed at once (and pods sharing a host
    # render theirs at the same instant): pod i of n goes at i/n of the round.
    servers = [MetricsServer() for _ in range(4)]
    for s in servers:
        await s.start()
    registry = fleet(*(s.endpoint for s in servers))
    scraper = MetricsScraper(registry, ScrapeSettings(interval_s=0.4, timeout_s=1.0))
    try:
        await scraper.start()
        await asyncio.sleep(1.0)
    finally:
        await scraper.stop()
        for s in servers:
            await s.stop()
    firsts = [s.hit_times[0] for s in servers]
    gaps = [b - a for a, b in itertools.pairwise(firsts)]
    assert all(0.07 <= g <= 0.2 for g in gaps), gaps  # 0.1 s apart, in registry order
    # every pod is still scraped once a round: ~2.5 rounds in 1 s
    assert all(2 <= s.hits <= 3 for s in servers), [s.hits for s in servers]


async def test_pod_removed_mid_scrape_is_not_written_back(servers) -> None:
    server = servers[0]
    server.mode = "stall"
    registry = fleet(server.endpoint)
    scraper = MetricsScraper(registry, ScrapeSettings(timeout_s=0.2, unhealthy_after=1))
    try:
        pending = asyncio.ensure_future(scraper.scrape_once())
        await asyncio.sleep(0.05)
        registry.remove(server.endpoint)
        await pending
    finally:
        await scraper.stop()
    assert server.endpoint not in registry
    assert scraper.stats.failures == 0
