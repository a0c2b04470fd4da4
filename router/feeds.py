"""The live fleet state behind a face: pod registry, metrics scraper, KV-event subscriber
feeding the scheduler's precise index, and discovery (the config file's `pods:`, reloaded on
change, or the Kubernetes API).

One wiring for every live face (proxy, ext_proc picker), so both see a fleet the same way:
events are on when the config has an `events` section or a pod names a `kv_events_endpoint`
(connect mode unless the section says bind), and only in token block mode (keys of text prompts
in chars mode never equal the token keys of events; the approximate index is used instead, with
a warning). Nothing here routes or forwards.

It also keeps the precise index honest about engines that went away or went quiet:
- a pod that turns unhealthy (failed scrapes, ejected by a face) has its blocks cleared — it
  may come back as a restarted engine with an empty cache at the same address; so does a pod
  whose `/metrics` process start time changes (unless batches of the new engine already
  arrived, which the subscriber's sequence check has handled). A sequence going back and
  `AllBlocksCleared` are handled in `router.events`.
- a pod whose engine computed blocks (its prefix-cache counters grew) while no KV-event batch
  arrived for `events.silent_after_s` is "silent": one warning, `silent` in `feed_report`
  and the `kvroute_kv_events_feed_silent` gauge, until a batch arrives again. The pod is
  also marked silent in the precise index (`BlockIndex.mark_silent`), so the scheduler
  complements its stale entries with the router's own record of its picks until then. The
  first baseline of a pod's counters is taken from a scrape `_SETTLE_S` after the first
  look: work the engine did before the router subscribed can reach its counters after the
  router's first scrape, and would otherwise count as computed with no batch.

And it checks the config against what the pods report (`check_agreement`): the engine's
block size (`BlockStored.block_size`, `/metrics` `cache_config_info`) against
`blocks.block_size`, and the token ids of its events against the router tokenizer's
vocabulary (a token id beyond it means the pod runs another tokenizer). Each disagreement is
one warning naming both values (`config_warnings`), however many pods and events show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from router.config import RouterConfig
from router.discovery.kubernetes import KubernetesDiscovery, KubernetesDiscoverySettings
from router.discovery.static import StaticDiscovery, StaticDiscoverySettings
from router.events.ingest import KVEventIngester
from router.events.settings import EventsSettings
from router.events.subscriber import KVEventSubscriber
from router.index import BlockIndex
from router.pods import PodRegistry
from router.scrape import MetricsScraper

log = logging.getLogger(__name__)

#: After a batch, the engine's counters are re-read from a scrape this much later.
_REBASE_AFTER_S = 1.0
#: The first baseline of a pod's counters comes from a scrape this long after the first look.
_SETTLE_S = 2.0


class FleetFeeds:
    def __init__(
        self,
        config: RouterConfig,
        registry: PodRegistry | None = None,
        config_path: str | Path | None = None,
        kubernetes: KubernetesDiscoverySettings | None = None,
    ) -> None:
        """`config_path`: re-read its `pods:` when the file changes (static discovery).
        `kubernetes`: take the pods from the Kubernetes API instead (the InferencePool's
        selector); `start` then waits for the first pod list."""
        self.config = config
        if registry is None:
            registry = PodRegistry()
            for pod in config.pods:
                registry.upsert(pod)
        self.registry = registry
        events = config.events
        wants_events = (
            events is not None
            or any(p.kv_events_endpoint for p in config.pods)
            or (kubernetes is not None and kubernetes.kv_events_port is not None)
        )
        if wants_events and config.blocks.mode != "tokens":
            log.warning(
                "KV events are ignored: blocks.mode is %r; precise prefix routing needs "
                "blocks.mode 'tokens' with the pods' tokenizer (approximate index used instead)",
                config.blocks.mode,
            )
            wants_events = False
        self.precise_index: BlockIndex | None = None
        self.subscriber: KVEventSubscriber | None = None
        if wants_events:
            events = events or EventsSettings(mode="connect")
            self.precise_index = BlockIndex(tier_weights=config.prefix_index.tier_weights)
            ingester = KVEventIngester(self.precise_index, config.blocks, events)
            self.subscriber = KVEventSubscriber(
                ingester, events, resolve_pod=lambda pod: pod if pod in self.registry else None
            )
        self.scraper = MetricsScraper(self.registry, config.scrape)
        self.discovery: StaticDiscovery | KubernetesDiscovery | None = None
        if kubernetes is not None:
            self.discovery = KubernetesDiscovery(self.registry, kubernetes)
        elif config_path is not None:
            self.discovery = StaticDiscovery(
                self.registry, StaticDiscoverySettings(path=str(config_path))
            )
        self._sync_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._silence: dict[str, _Silence] = {}
        #: One line per config/pod disagreement found (each also logged once as a warning).
        self.config_warnings: list[str] = []
        self._disagreements: set[tuple[str, object, object]] = set()
        self._vocab_size: int | None = None
        if self.subscriber is not None:
            self.registry.on_health_change(self._health_changed)
            self.scraper.on_restart(self._engine_restarted)

    async def start(self) -> None:
        if self.discovery is not None:
            await self.discovery.start()
            if isinstance(self.discovery, KubernetesDiscovery):
                await self.discovery.synced.wait()
        if self.subscriber is not None:
            self.subscriber.attach(self.registry)
            await self.subscriber.start()
            self._sync_kv_pods()
            self._sync_task = asyncio.create_task(self._follow_registry(), name="kv-pod-sync")
            self._watch_task = asyncio.create_task(self._watch_silence(), name="kv-silence")
        await self.scraper.scrape_once()
        await self.scraper.start()

    async def stop(self) -> None:
        for task in (self._sync_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sync_task = self._watch_task = None
        await self.scraper.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.subscriber is not None:
            await self.subscriber.close()

    def _sync_kv_pods(self) -> None:
        """Connect mode: listen to every pod that names a PUB endpoint; register replay ones."""
        sub = self.subscriber
        if sub is None:
            return
        connect = sub.settings.mode == "connect"
        for pod in self.registry:
            endpoint = pod.kv_events_endpoint if connect else None
            if endpoint or pod.kv_replay_endpoint:
                sub.add_pod(pod.endpoint, endpoint, pod.kv_replay_endpoint)

    async def _follow_registry(self) -> None:
        """Pods added by discovery get their KV-event sockets (removals are `attach`ed)."""
        seen = self.registry.version
        while True:
            await asyncio.sleep(0.5)
            if self.registry.version != seen:
                seen = self.registry.version
                self._sync_kv_pods()

    # ---------------------------------------------------------------- stale and silent pods
    def _health_changed(self, endpoint: str, healthy: bool) -> None:
        if healthy or self.subscriber is None or endpoint not in self.registry:
            return
        self.subscriber.stats.pods_cleared += 1
        self._forget_silence(endpoint)
        self.subscriber.pod_restarted(endpoint, "pod unhealthy; it may return as an empty engine")

    def _engine_restarted(self, endpoint: str, reason: str) -> None:
        sub = self.subscriber
        pod = self.registry.get(endpoint)
        if sub is None or pod is None:
            return
        started = pod.metrics.process_start_time
        heard = sub.feed_state(endpoint).last_event_wall
        if started is not None and heard is not None and heard >= started:
            return  # batches of the new engine arrived already: the index is its own
        sub.stats.pods_cleared += 1
        self._forget_silence(endpoint)
        sub.pod_restarted(endpoint, reason)

    def _forget_silence(self, endpoint: str) -> None:
        """The engine may be a new, empty one: the router's record of its picks on the old
        one must not stand in for it, and its counters start a new baseline."""
        self._silence.pop(endpoint, None)
        self._mark_silent(endpoint, False)

    async def _watch_silence(self) -> None:
        interval = min(1.0, self.subscriber.settings.silent_after_s / 4) if self.subscriber else 1
        while True:
            await asyncio.sleep(interval)
            self.check_silence(time.monotonic())
            self.check_agreement()

    def check_silence(self, now: float) -> None:
        """Mark pods silent (or no longer silent); see the module docstring."""
        sub = self.subscriber
        if sub is None:
            return
        settings = sub.settings
        due_tokens = settings.silent_after_blocks * self.config.blocks.block_size
        for pod in self.registry:
            m = pod.metrics
            if m.prefix_cache_queries is None or m.prefix_cache_hits is None:
                continue  # the page does not say what the engine computed
            computed = m.prefix_cache_queries - m.prefix_cache_hits
            feed = sub.feed_state(pod.endpoint)
            tr = self._silence.get(pod.endpoint)
            if tr is None or computed < tr.computed:  # first look, or the engine restarted
                if tr is not None and tr.silent:
                    self._mark_silent(pod.endpoint, False)
                self._silence[pod.endpoint] = _Silence(
                    computed, feed.batches, rebase_at=now + _SETTLE_S
                )
                continue
            if feed.batches != tr.batches:
                if tr.silent:
                    log.info("kv events: pod %s feed resumed (seq %s)", pod.endpoint, feed.last_seq)
                    self._mark_silent(pod.endpoint, False)
                tr.batches, tr.silent, tr.due_since = feed.batches, False, None
                # Count from a scrape taken after this batch (and the work behind it) settled:
                # a scrape older than the batch would not show the tokens it announced.
                tr.rebase_at = (feed.last_event_at or now) + _REBASE_AFTER_S
                continue
            if tr.rebase_at is not None:
                if m.taken_at is not None and m.taken_at >= tr.rebase_at:
                    tr.computed, tr.rebase_at = computed, None
                continue
            if tr.silent or computed - tr.computed < due_tokens:
                continue
            if tr.due_since is None:
                tr.due_since = now
            elif now - tr.due_since >= settings.silent_after_s:
                tr.silent = True
                sub.stats.silent_feeds += 1
                self._mark_silent(pod.endpoint, True)
                age = None if feed.last_event_at is None else now - feed.last_event_at
                log.warning(
                    "kv events: pod %s feed is silent: its engine computed %d tokens and no "
                    "batch arrived for %s (last seq %s); its precise index entries are stale "
                    "(the router's own picks stand in for them until events resume)",
                    pod.endpoint,
                    computed - tr.computed,
                    "ever" if age is None else f"{age:.1f} s",
                    feed.last_seq,
                )

    def silence_baseline_ready(self, endpoint: str) -> bool:
        """True once the silence rule has a settled baseline of the pod's counters: work the
        engine does from now on without a batch will be told apart as silence."""
        tr = self._silence.get(endpoint)
        return tr is not None and tr.rebase_at is None

    def _mark_silent(self, endpoint: str, silent: bool) -> None:
        if self.precise_index is not None:
            self.precise_index.mark_silent(endpoint, silent)

    # ------------------------------------------------------------ config agreement
    def check_agreement(self) -> None:
        """Compare `blocks.block_size` and the router tokenizer with what each pod reports
        (its `/metrics` block size, its latest `BlockStored`); warn once per disagreement."""
        sub = self.subscriber
        if sub is None:
            return
        want = self.config.blocks.block_size
        samples = sub.ingester.stored_samples
        for pod in self.registry:
            reported = pod.metrics.block_size
            if reported is not None and reported != want:
                self._block_size_disagrees(pod.endpoint, reported, "its /metrics cache_config_info")
            ev = samples.pop(pod.endpoint, None)
            if ev is None:
                continue
            if ev.block_size != want:
                self._block_size_disagrees(
                    pod.endpoint, ev.block_size, "its KV events' BlockStored block_size"
                )
            vocab = self._router_vocab_size()
            top = max(ev.token_ids, default=-1)
            if vocab is not None and top >= vocab:
                self._disagree(
                    ("tokenizer", vocab, None),  # one warning, whichever pods show it
                    f"the router's tokenizer ({self.config.blocks.tokenizer_path}) has "
                    f"{vocab} tokens but pod {pod.endpoint}'s KV events carry token id {top}: "
                    "the pod runs another tokenizer, so no event key can equal a prompt's; "
                    "set blocks.tokenizer_path to the model's tokenizer.json",
                )

    def _block_size_disagrees(self, endpoint: str, reported: int, where: str) -> None:
        want = self.config.blocks.block_size
        if reported > 0 and reported % want == 0:
            effect = (
                f"each engine block is keyed as {reported // want} router blocks, and prompts "
                f"ending inside an engine block are predicted as cached when they are not"
            )
        else:
            effect = "its KV events cannot be keyed and are skipped (precise index stays empty)"
        self._disagree(
            ("block_size", want, reported),
            f"blocks.block_size is {want} in the router config but pod {endpoint} reports "
            f"{reported} ({where}): {effect}; set blocks.block_size: {reported}",
        )

    def _disagree(self, key: tuple[str, object, object], message: str) -> None:
        if key in self._disagreements:
            return
        self._disagreements.add(key)
        self.config_warnings.append(message)
        log.warning("config: %s", message)

    def _router_vocab_size(self) -> int | None:
        """The router tokenizer's vocabulary size (loaded once; None without a tokenizer)."""
        if self._vocab_size is None:
            path = self.config.blocks.tokenizer_path
            if not path:
                return None
            from tokenizers import Tokenizer

            if Path(path).is_dir():
                path = str(Path(path) / "tokenizer.json")
            try:
                self._vocab_size = Tokenizer.from_file(path).get_vocab_size()
            except Exception:  # unreadable here; the keyer reports it where it loads it
                self._vocab_size = -1
        return None if self._vocab_size < 0 else self._vocab_size

    def feed_report(self, endpoint: str, now: float | None = None) -> dict[str, Any] | None:
        """The pod's KV-event feed for `/debug/pods` (None when events are off)."""
        sub = self.subscriber
        if sub is None:
            return None
        now = time.monotonic() if now is None else now
        feed = sub.feed_state(endpoint)
        tr = self._silence.get(endpoint)
        age = None if feed.last_event_at is None else round(now - feed.last_event_at, 3)
        return {
            "mode": sub.settings.mode,
            "connected": feed.connected,
            "last_event_age_s": age,
            "last_seq": feed.last_seq,
            "batches": feed.batches,
            "silent": bool(tr and tr.silent),
            "rebuilding": endpoint in sub.ingester.rebuilding_pods(),
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """prometheus_client collector of the per-pod feed gauges (register it on a face's
        registry): last batch age, silent, connected, last sequence."""
        if self.subscriber is None:
            return
        now = time.monotonic()
        age = GaugeMetricFamily(
            "kvroute_kv_events_last_event_age_seconds",
            "Seconds since the pod's last live KV-event batch (absent before the first).",
            labels=["pod"],
        )
        silent = GaugeMetricFamily(
            "kvroute_kv_events_feed_silent",
            "1 while the pod's engine computes blocks and no KV-event batch arrives.",
            labels=["pod"],
        )
        connected = GaugeMetricFamily(
            "kvroute_kv_events_connected",
            "Connect mode: 1 while the TCP connection to the pod's PUB socket is up.",
            labels=["pod"],
        )
        seq = GaugeMetricFamily(
            "kvroute_kv_events_last_seq", "Sequence number of the pod's last batch.", labels=["pod"]
        )
        for pod in self.registry:
            report = self.feed_report(pod.endpoint, now)
            assert report is not None
            if report["last_event_age_s"] is not None:
                age.add_metric([pod.endpoint], report["last_event_age_s"])
                seq.add_metric([pod.endpoint], report["last_seq"])
            silent.add_metric([pod.endpoint], 1.0 if report["silent"] else 0.0)
            if report["connected"] is not None:
                connected.add_metric([pod.endpoint], 1.0 if report["connected"] else 0.0)
        yield from (age, silent, connected, seq)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters of every feed, by feed, as plain data (for metrics and debug pages)."""
        out: dict[str, dict[str, Any]] = {"scrapes": _as_dict(self.scraper.stats)}
        if self.subscriber is not None:
            out["kv_events"] = _as_dict(self.subscriber.stats)
        if self.discovery is not None:
            out["discovery"] = _as_dict(self.discovery.stats)
        return out


@dataclass(slots=True)
class _Silence:
    """Per pod: the engine's computed tokens and our batch count when we last heard it."""

    computed: float
    batches: int
    due_since: float | None = None
    silent: bool = False
    #: Take `computed` again from the first scrape at or after this time (after a batch).
    rebase_at: float | None = None


def _as_dict(stats: Any) -> dict[str, Any]:
    fields = getattr(stats, "__dataclass_fields__", {})
    return {name: getattr(stats, name) for name in fields}
