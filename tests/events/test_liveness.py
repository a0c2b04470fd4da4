"""Stale and silent pods: `FleetFeeds` clears a pod that went down or restarted, marks a pod
whose engine works while its KV-event feed says nothing (and the scheduler then falls back to
its own picks for it), and warns once when a pod's block size or token ids disagree with the
config (real HTTP on loopback; scrape times are set explicitly where the rule depends on
them)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from router.config import parse_config
from router.events.types import BlockStored
from router.feeds import FleetFeeds
from router.request import parse_request
from router.scheduler import Scheduler
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


PRECISE = """
plugins:
  - type: prefix-cache-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - {pluginRef: prefix-cache-scorer, weight: 1}
      - {pluginRef: max-score-picker}
"""


def feeds_for(*endpoints: str, block_size: int = 32, extra: str = "") -> FleetFeeds:
    pods = "".join(f"  - {{endpoint: '{ep}', models: [tiny]}}\n" for ep in endpoints)
    text = f"""
pods:
{pods}blocks: {{mode: tokens, tokenizer_path: '{TOKENIZER}', block_size: {block_size}}}
events: {{mode: bind, endpoint: 'tcp://127.0.0.1:*', silent_after_s: 1.0, silent_after_blocks: 2}}
scrape: {{interval_s: 60}}
seed: 3
{extra}"""
    return FleetFeeds(parse_config(text, "<test>"))


async def scrape_at(feeds: FleetFeeds, pod: MetricsPod, t: float) -> None:
    """Fetch the pod's real page over HTTP and record it as a scrape taken at time `t`."""
    async with httpx.AsyncClient() as c:
        page = (await c.get(f"http://{pod.endpoint}/metrics")).text
    feeds.registry.set_metrics(pod.endpoint, parse_vllm_metrics(page, now=t))


def batch_arrives(feeds: FleetFeeds, endpoint: str, at: float) -> None:
    """What the subscriber records for one live batch of `endpoint` at `at`."""
    assert feeds.subscriber is not None
    state = feeds.subscriber.feed_state(endpoint)
    state.batches += 1
    state.last_seq = (state.last_seq or 0) + 1
    state.last_event_at = at


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
    sub, index = feeds.subscriber, feeds.precise_index
    assert sub is not None and index is not None
    await scrape_at(feeds, pod, 100.0)
    feeds.check_silence(100.0)  # first look: the baseline waits for a settled scrape
    await scrape_at(feeds, pod, 102.5)
    feeds.check_silence(102.5)  # baseline
    pod.queries += 40  # one block and a bit: not due yet
    await scrape_at(feeds, pod, 103.0)
    feeds.check_silence(103.0)
    feeds.check_silence(107.0)
    assert not feeds.feed_report(pod.endpoint)["silent"]
    pod.queries += 40  # two blocks' worth computed, and no batch
    await scrape_at(feeds, pod, 108.0)
    with caplog.at_level(logging.WARNING):
        feeds.check_silence(108.0)
        feeds.check_silence(108.5)
        assert not feeds.feed_report(pod.endpoint)["silent"]  # within silent_after_s
        feeds.check_silence(109.1)
        feeds.check_silence(112.0)
    report = feeds.feed_report(pod.endpoint)
    assert report["silent"] and report["last_seq"] is None and report["connected"] is None
    assert index.silent_pods == {pod.endpoint}
    assert sub.stats.silent_feeds == 1
    assert sum("feed is silent" in r.getMessage() for r in caplog.records) == 1
    # A batch arrives: not silent any more, in the report and in the index.
    batch_arrives(feeds, pod.endpoint, 112.0)
    feeds.check_silence(112.2)
    assert not feeds.feed_report(pod.endpoint)["silent"]
    assert index.silent_pods == set()


async def test_hits_do_not_count_as_computed_work(pod: MetricsPod) -> None:
    feeds = feeds_for(pod.endpoint)
    await scrape_at(feeds, pod, 100.0)
    feeds.check_silence(100.0)
    await scrape_at(feeds, pod, 102.5)
    feeds.check_silence(102.5)
    pod.queries += 320
    pod.hits += 320  # all served from cache: no new blocks, no events due
    await scrape_at(feeds, pod, 103.0)
    for t in (103.0, 105.0, 107.0):
        feeds.check_silence(t)
    assert not feeds.feed_report(pod.endpoint)["silent"]


async def test_work_reaching_the_counters_after_the_first_scrape_is_not_silence(
    pod: MetricsPod,
) -> None:
    """The first baseline waits for a scrape taken `_SETTLE_S` after the first look: work the
    engine did before the router subscribed (its batches never reached this router) lands in
    the counters of a later scrape and must not read as blocks computed without events."""
    feeds = feeds_for(pod.endpoint)
    sub = feeds.subscriber
    assert sub is not None
    await scrape_at(feeds, pod, 100.0)
    feeds.check_silence(100.0)  # first look
    pod.queries += 320  # ten blocks of earlier work reach the counters late
    await scrape_at(feeds, pod, 101.0)
    for t in (101.0, 101.5):  # still settling: no baseline yet
        feeds.check_silence(t)
    await scrape_at(feeds, pod, 102.1)
    for t in (102.1, 104.0, 106.0, 110.0):
        feeds.check_silence(t)
    assert not feeds.feed_report(pod.endpoint)["silent"]
    assert sub.stats.silent_feeds == 0
    # Work after the settled baseline still counts.
    pod.queries += 64
    await scrape_at(feeds, pod, 111.0)
    for t in (111.0, 112.5):
        feeds.check_silence(t)
    assert feeds.feed_report(pod.endpoint)["silent"]


async def test_a_silent_pod_keeps_the_follow_up_of_its_own_picks() -> None:
    """While A's feed is silent, the scheduler's precise lookups read its own picks for A
    (pending entries have expired by the follow-up); once events resume, only the precise
    index counts again."""
    async with MetricsPod() as a, MetricsPod() as b:
        feeds = feeds_for(a.endpoint, b.endpoint, extra=PRECISE)
        index = feeds.precise_index
        assert index is not None
        sched = Scheduler(feeds.config, feeds.registry, precise_index=index)
        for pod in (a, b):
            await scrape_at(feeds, pod, 100.0)
        feeds.check_silence(100.0)
        for pod in (a, b):
            await scrape_at(feeds, pod, 102.5)
        feeds.check_silence(102.5)
        a.queries += 96  # A computes, its events never come
        await scrape_at(feeds, a, 103.0)
        for t in (103.0, 104.5):
            feeds.check_silence(t)
        assert index.silent_pods == {a.endpoint}

        turn = " ".join(f"word{i}" for i in range(120))
        first = parse_request({"model": "tiny", "prompt": turn}, "/v1/completions")
        d = sched.schedule(first, subset=[a.endpoint], now=105.0)
        assert d.target == a.endpoint and d.explain()["pods"][0]["prefix_hit"] == 0.0
        sched.on_pick(d, now=105.0)
        sched.on_first_token(d, now=105.5)
        sched.on_complete(d, now=106.0)

        follow = {"model": "tiny", "prompt": turn + " and then some more words"}
        d2 = sched.schedule(parse_request(follow, "/v1/completions"), now=200.0)
        assert index.pending_count() == 0  # the pick's pending entry expired long ago
        hits = {p["endpoint"]: p["prefix_hit"] for p in d2.explain()["pods"]}
        assert d2.target == a.endpoint
        nkeys = len(first.block_keys or [])
        assert nkeys >= 3 and hits[a.endpoint] > 0.5 and hits[b.endpoint] == 0.0

        batch_arrives(feeds, a.endpoint, 200.0)  # events resume (a replay refills the truth)
        feeds.check_silence(200.1)
        assert index.silent_pods == set()
        d3 = sched.schedule(parse_request(follow, "/v1/completions"), now=201.0)
        assert {p["prefix_hit"] for p in d3.explain()["pods"]} == {0.0}


def stored(block_size: int, tokens: list[int]) -> BlockStored:
    n = len(tokens) // block_size
    return BlockStored(
        block_hashes=list(range(1, n + 1)),
        parent_block_hash=None,
        token_ids=tokens,
        block_size=block_size,
        lora_id=None,
        medium="GPU",
    )


async def test_a_block_size_disagreement_is_one_warning_naming_both_values(
    pod: MetricsPod, caplog
) -> None:
    other = MetricsPod()
    async with other:
        feeds = feeds_for(pod.endpoint, other.endpoint, block_size=16)
        sub = feeds.subscriber
        assert sub is not None
        with caplog.at_level(logging.WARNING, logger="router.feeds"):
            for _ in range(3):
                for ep in (pod.endpoint, other.endpoint):
                    sub.ingester.apply_events(ep, [stored(32, list(range(64)))])
                feeds.check_agreement()
        lines = [r.getMessage() for r in caplog.records if "block_size" in r.getMessage()]
        assert len(lines) == 1 and feeds.config_warnings == [lines[0].removeprefix("config: ")]
        assert "blocks.block_size is 16" in lines[0] and "reports 32" in lines[0]
        # 32 is a multiple of 16: the events are still keyed (two router blocks each).
        assert feeds.precise_index.pod_block_count(pod.endpoint) == 4


async def test_token_ids_beyond_the_router_vocabulary_warn_once(pod: MetricsPod, caplog) -> None:
    async with MetricsPod() as other:
        feeds = feeds_for(pod.endpoint, other.endpoint)
        sub = feeds.subscriber
        assert sub is not None
        with caplog.at_level(logging.WARNING, logger="router.feeds"):
            sub.ingester.apply_events(pod.endpoint, [stored(32, list(range(32)))])
            feeds.check_agreement()
            assert feeds.config_warnings == []  # ids within the vocabulary: nothing to say
            for _ in range(2):  # both pods, twice: one warning
                for ep in (pod.endpoint, other.endpoint):
                    sub.ingester.apply_events(ep, [stored(32, [5] * 31 + [128_000])])
                feeds.check_agreement()
    assert len(feeds.config_warnings) == 1
    msg = feeds.config_warnings[0]
    assert "8192 tokens" in msg and "token id 128000" in msg and pod.endpoint in msg


async def test_a_silent_pod_turning_unhealthy_ends_the_fallback(pod: MetricsPod) -> None:
    """It may come back as an empty engine: the router's picks on the old one must not stand
    in for its cache, and its counters get a new baseline."""
    feeds = feeds_for(pod.endpoint)
    index = feeds.precise_index
    assert index is not None
    await scrape_at(feeds, pod, 100.0)
    feeds.check_silence(100.0)
    await scrape_at(feeds, pod, 102.5)
    feeds.check_silence(102.5)
    pod.queries += 96
    await scrape_at(feeds, pod, 103.0)
    for t in (103.0, 104.5):
        feeds.check_silence(t)
    assert index.silent_pods == {pod.endpoint}
    feeds.registry.set_health(pod.endpoint, False)
    assert index.silent_pods == set()
    assert not feeds.feed_report(pod.endpoint)["silent"]
    assert not feeds.silence_baseline_ready(pod.endpoint)
