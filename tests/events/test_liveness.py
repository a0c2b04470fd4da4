"""Stale and silent pods: `FleetFeeds` clears a pod that went down or restarted, and marks a
pod whose engine works while its KV-event feed says nothing (real HTTP on loopback)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from router.config import parse_config
from router.feeds import FleetFeeds
from router.scrape import parse_vllm_metrics

TOKENIZER = Path(__file__).resolve().parents[2] / "router" / "data" / "tokenizer" / "tokenizer.json"

# Lines as vLLM 0.32's /metrics writes them (trimmed).
PAGE = """# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds {start}
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="tiny"}} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="tiny"}} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} 0.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="tiny"}} {queries}
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{{engine="0",model_name="tiny"}} 1.7961680571943183e+09
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="tiny"}} {hits}
"""


class MetricsPod:
    def __init__(self) -> None:
        self.start, self.queries, self.hits = 1.79616779927e09, 132.0, 0.0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _req: web.Request) -> web.Response:
        return web.Response(
            text=PAGE.format(start=self.start, queries=self.queries, hits=self.hits)
        )

    async def __aenter__(self) -> MetricsPod:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def pod() -> AsyncIterator[MetricsPod]:
    async with MetricsPod() as p:
        yield p


def feeds_for(endpoint: str) -> FleetFeeds:
    text = f"""
pods:
  - {{endpoint: '{endpoint}', models: [tiny]}}
blocks: {{mode: tokens, tokenizer_path: '{TOKENIZER}', block_size: 32}}
events: {{mode: bind, endpoint: 'tcp://127.0.0.1:*', silent_after_s: 1.0, silent_after_blocks: 2}}
scrape: {{interval_s: 60}}
"""
    return FleetFeeds(parse_config(text, "<test>"))


def test_vllm_032_page_gives_process_start_and_prefix_cache_counters() -> None:
    snap = parse_vllm_metrics(PAGE.format(start=1.7e9, queries=500.0, hits=64.0), now=1.0)
    assert snap.process_start_time == 1.7e9
    assert (snap.prefix_cache_queries, snap.prefix_cache_hits) == (500.0, 64.0)


async def test_a_pod_turning_unhealthy_loses_its_blocks(pod: MetricsPod) -> None:
    feeds = feeds_for(pod.endpoint)
    index = feeds.precise_index
    assert index is not None and feeds.subscriber is not None
    index.add_blocks(pod.endpoint, [1, 2, 3])
    feeds.registry.set_health(pod.endpoint, False)
    await feeds.subscriber.ingester.drain()
    assert index.pod_block_count(pod.endpoint) == 0
    assert feeds.subscriber.stats.pods_cleared == 1


async def test_a_changed_process_start_time_clears_the_pod(pod: MetricsPod, caplog) -> None:
    feeds = feeds_for(pod.endpoint)
    index, sub = feeds.precise_index, feeds.subscriber
    assert index is not None and sub is not None
    await feeds.scraper.scrape_once()
    index.add_blocks(pod.endpoint, [1, 2, 3])
    await feeds.scraper.scrape_once()  # same process: nothing happens
    await sub.ingester.drain()
    assert index.pod_block_count(pod.endpoint) == 3
    pod.start += 60
    with caplog.at_level(logging.WARNING):
        await feeds.scraper.scrape_once()
        await sub.ingester.drain()
    assert index.pod_block_count(pod.endpoint) == 0
    assert feeds.scraper.stats.restarts == 1 and sub.stats.pods_cleared == 1
    assert any("engine restarted" in r.getMessage() for r in caplog.records)
    await feeds.scraper.stop()


async def test_a_restart_whose_new_events_already_arrived_keeps_them(pod: MetricsPod) -> None:
    import time

    feeds = feeds_for(pod.endpoint)
    index, sub = feeds.precise_index, feeds.subscriber
    assert index is not None and sub is not None
    await feeds.scraper.scrape_once()
    pod.start = time.time() - 5  # the new engine started 5 s ago ...
    index.add_blocks(pod.endpoint, [7, 8])
    sub.feed_state(pod.endpoint).last_event_wall = time.time()  # ... and its events came in
    await feeds.scraper.scrape_once()
    await sub.ingester.drain()
    assert index.pod_block_count(pod.endpoint) == 2
    assert feeds.scraper.stats.restarts == 1 and sub.stats.pods_cleared == 0
    await feeds.scraper.stop()


async def test_an_engine_computing_with_no_batches_is_marked_silent_once(
    pod: MetricsPod, caplog
) -> None:
    feeds = feeds_for(pod.endpoint)
    sub = feeds.subscriber
    assert sub is not None
    await feeds.scraper.scrape_once()
    feeds.check_silence(100.0)  # baseline
    pod.queries += 40  # one block and a bit: not due yet
    await feeds.scraper.scrape_once()
    feeds.check_silence(101.0)
    feeds.check_silence(105.0)
    assert not feeds.feed_report(pod.endpoint)["silent"]
    pod.queries += 40  # two blocks' worth computed, and no batch
    await feeds.scraper.scrape_once()
    with caplog.at_level(logging.WARNING):
        feeds.check_silence(106.0)
        feeds.check_silence(106.5)
        assert not feeds.feed_report(pod.endpoint)["silent"]  # within silent_after_s
        feeds.check_silence(107.1)
        feeds.check_silence(110.0)
    report = feeds.feed_report(pod.endpoint)
    assert report["silent"] and report["last_seq"] is None and report["connected"] is None
    assert sub.stats.silent_feeds == 1
    assert sum("feed is silent" in r.getMessage() for r in caplog.records) == 1
    # A batch arrives: not silent any more.
    state = sub.feed_state(pod.endpoint)
    state.batches, state.last_seq, state.last_event_at = 1, 0, 110.0
    feeds.check_silence(110.2)
    assert not feeds.feed_report(pod.endpoint)["silent"]
    await feeds.scraper.stop()


async def test_hits_do_not_count_as_computed_work(pod: MetricsPod) -> None:
    feeds = feeds_for(pod.endpoint)
    await feeds.scraper.scrape_once()
    feeds.check_silence(100.0)
    pod.queries += 320
    pod.hits += 320  # all served from cache: no new blocks, no events due
    await feeds.scraper.scrape_once()
    for t in (101.0, 103.0, 105.0):
        feeds.check_silence(t)
    assert not feeds.feed_report(pod.endpoint)["silent"]
    await feeds.scraper.stop()
