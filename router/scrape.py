"""Polling of each pod's vLLM Prometheus `/metrics` page into `PodRegistry` snapshots.

Owns the text-page parser (`parse_vllm_metrics`, pure) and the asyncio scrape loop
(`MetricsScraper`). It writes only `registry.set_metrics` and `registry.set_health`; it never
touches in-flight accounting or the block index.

Restarts: the page's `process_start_time_seconds` (prometheus_client's process collector,
which vLLM's server exports) changing between two scrapes means the engine behind the address
restarted — its KV cache is empty — and `on_restart` callbacks hear of it.

Failure policy: a failed scrape keeps the last values but marks them stale (`taken_at` stays, so
scorers see the age grow); `unhealthy_after` consecutive failures mark the pod unhealthy until a
scrape succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.pods import MetricsSnapshot, Pod, PodRegistry

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
LORA_INFO = "vllm:lora_requests_info"
CACHE_CONFIG = "vllm:cache_config_info"
PROCESS_START = "process_start_time_seconds"
PREFIX_QUERIES = "vllm:prefix_cache_queries"
PREFIX_HITS = "vllm:prefix_cache_hits"
#: Start times closer than this are the same process (the value is rounded to ticks).
_RESTART_EPSILON_S = 1.0


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    interval_s: float = 0.2
    timeout_s: float = 1.0
    #: Most scrapes in flight at once across the fleet.
    concurrency: int = 16
    #: Consecutive failed scrapes after which the pod is marked unhealthy.
    unhealthy_after: int = 3
    metrics_path: str = "/metrics"

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError("scrape interval_s and timeout_s must be > 0")
        if self.concurrency < 1 or self.unhealthy_after < 1:
            raise ValueError("scrape concurrency and unhealthy_after must be >= 1")
        if not self.metrics_path.startswith("/"):
            raise ValueError(f"scrape metrics_path must start with '/': {self.metrics_path!r}")


class MetricsParseError(ValueError):
    """The page is not Prometheus text, or carries none of vLLM's load gauges."""


def _known_lines(text: str) -> str:
    """Only the lines of the metrics kvroute reads (and their HELP/TYPE lines).

    A vLLM page is mostly histogram buckets nobody here reads; prometheus_client's pure-Python
    parser spent ~90% of a scrape on them. The gauges kept are parsed by it as before.
    """
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) > 2 and parts[2] in _KNOWN_LINE_NAMES:
                keep.append(line)
        else:
            brace = line.find("{")
            name = line[:brace] if brace >= 0 else line.partition(" ")[0]
            if name in _KNOWN_LINE_NAMES:
                keep.append(line)
    keep.append("")
    return "\n".join(keep)


#: Request counts above this are an exporter's garbage; held here so the sum stays an int.
_MAX_COUNT = 10**9


def _count(value: float) -> int:
    """A summed request count as a non-negative int (finite samples can still sum to inf)."""
    return int(min(max(value, 0.0), _MAX_COUNT))


def parse_vllm_metrics(text: str, model: str | None = None, *, now: float) -> MetricsSnapshot:
    """Read a vLLM `/metrics` page into a snapshot taken at `now`.

    Request counts are summed across `engine` labels (data-parallel ranks); KV usage is their
    mean, since each rank reports the fraction of its own cache. With `model`, only samples whose
    `model_name` label equals it (or that carry no `model_name`) count. Unknown metrics are
    ignored. Raises MetricsParseError on a page that does not parse or has neither
    `vllm:num_requests_running` nor `vllm:num_requests_waiting`.
    """
    waiting = running = 0.0
    kv_sum = 0.0
    kv_engines = 0
    kv_old_sum = 0.0
    kv_old_engines = 0
    seen_load = False
    # Per engine, the lora_requests_info sample with the greatest value (= latest timestamp).
    lora_latest: dict[str, tuple[float, str, str]] = {}
    block_size: int | None = None
    gpu_blocks: dict[str, int] = {}  # per engine label
    start_time: float | None = None
    counters: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(_known_lines(text)):
            name = family.name.removesuffix("_total")
            if name not in _KNOWN:
                continue
            for sample in family.samples:
                labels = sample.labels
                if not math.isfinite(sample.value):
                    continue  # NaN/±Inf from a broken exporter: no count or time in it
                if name == PROCESS_START:
                    start_time = sample.value
                    continue
                if name in (PREFIX_QUERIES, PREFIX_HITS):
                    if model is not None and labels.get("model_name", model) != model:
                        continue
                    if sample.name.endswith("_total"):
                        counters[name] = counters.get(name, 0.0) + sample.value
                    continue
                if model is not None and labels.get("model_name", model) != model:
                    continue
                value = sample.value
                if name == RUNNING:
                    running += value
                    seen_load = True
                elif name == WAITING:
                    waiting += value
                    seen_load = True
                elif name == KV_USAGE:
                    kv_sum += value
                    kv_engines += 1
                elif name == KV_USAGE_OLD:
                    kv_old_sum += value
                    kv_old_engines += 1
                elif name == LORA_INFO:
                    engine = labels.get("engine", "")
                    best = lora_latest.get(engine)
                    if best is None or value > best[0]:
                        lora_latest[engine] = (
                            value,
                            labels.get("running_lora_adapters", ""),
                            labels.get("waiting_lora_adapters", ""),
                        )
                elif name == CACHE_CONFIG:
                    if "block_size" in labels:
                        block_size = _positive_int(labels["block_size"]) or block_size
                    blocks = _positive_int(labels.get("num_gpu_blocks", ""))
                    if blocks:
                        gpu_blocks[labels.get("engine", "")] = blocks
    except MetricsParseError:
        raise
    except Exception as exc:  # the parser raises ValueError, but also others on odd bytes
        raise MetricsParseError(f"not a Prometheus text page: {exc}") from exc
    if not seen_load:
        scope = f" for model {model!r}" if model is not None else ""
        raise MetricsParseError(f"no {RUNNING} or {WAITING} samples{scope}")
    if kv_engines:
        kv = kv_sum / kv_engines
    elif kv_old_engines:
        kv = kv_old_sum / kv_old_engines
    else:
        kv = 0.0
    running_adapters: set[str] = set()
    waiting_adapters: set[str] = set()
    for _, run, wait in lora_latest.values():
        running_adapters.update(_split_names(run))
        waiting_adapters.update(_split_names(wait))
    return MetricsSnapshot(
        waiting=_count(waiting),
        running=_count(running),
        kv_utilization=min(1.0, max(0.0, kv)),
        running_adapters=frozenset(running_adapters),
        waiting_adapters=frozenset(waiting_adapters),
        block_size=block_size,
        num_gpu_blocks=sum(gpu_blocks.values()) or None,
        process_start_time=start_time,
        prefix_cache_queries=counters.get(PREFIX_QUERIES),
        prefix_cache_hits=counters.get(PREFIX_HITS),
        taken_at=now,
        stale=False,
    )


_KNOWN = frozenset(
    {
        WAITING,
        RUNNING,
        KV_USAGE,
        KV_USAGE_OLD,
        LORA_INFO,
        CACHE_CONFIG,
        PROCESS_START,
        PREFIX_QUERIES,
        PREFIX_HITS,
    }
)
_KNOWN_LINE_NAMES = _KNOWN | {f"{name}_total" for name in (PREFIX_QUERIES, PREFIX_HITS)}


def _positive_int(text: str) -> int | None:
    """A label's positive decimal integer, else None (labels are free text: "x", "0", "²")."""
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def _split_names(csv: str) -> list[str]:
    return [name for name in (part.strip() for part in csv.split(",")) if name]


@dataclass(slots=True)
class ScrapeStats:
    """Counters since start, for telemetry and tests."""

    scrapes_ok: int = 0
    #: Failed scrapes of any kind (connection, timeout, HTTP status, parse).
    failures: int = 0
    timeouts: int = 0
    parse_errors: int = 0
    marked_unhealthy: int = 0
    recovered: int = 0
    #: Engines seen restarting (their process start time changed).
    restarts: int = 0


@dataclass(slots=True)
class _PodScrapeState:
    consecutive_failures: int = 0
    #: True while this scraper holds the pod unhealthy; only then does a success restore health,
    #: so a pod another component marked unhealthy is not revived by a good scrape.
    held_unhealthy: bool = False


class MetricsScraper:
    """Scrapes every pod in `registry` each `interval_s`, at most `concurrency` at once.

    Each pod is scraped independently: a pod whose previous scrape is still in flight (e.g. a
    stalled server waiting out `timeout_s`) skips ticks instead of delaying the others.
    """

    def __init__(
        self,
        registry: PodRegistry,
        settings: ScrapeSettings | None = None,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.settings = settings or ScrapeSettings()
        self.stats = ScrapeStats()
        self._clock = clock
        self._client = client
        self._owns_client = client is None
        self._semaphore = asyncio.Semaphore(self.settings.concurrency)
        self._states: dict[str, _PodScrapeState] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._on_restart: list[Callable[[str, str], None]] = []
        self._on_snapshot: list[Callable[[str, MetricsSnapshot], None]] = []

    def on_snapshot(self, callback: Callable[[str, MetricsSnapshot], None]) -> None:
        """Call `callback(endpoint, snapshot)` after each successful scrape of a known pod
        (e.g. to follow the engine's prefix-cache counters, `router.reuse`)."""
        self._on_snapshot.append(callback)

    def on_restart(self, callback: Callable[[str, str], None]) -> None:
        """Call `callback(endpoint, reason)` when a pod's engine is seen to have restarted."""
        self._on_restart.append(callback)

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="metrics-scraper")

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pending = list(self._inflight.values())
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._inflight.clear()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def scrape_once(self) -> None:
        """Scrape every pod now (joining scrapes already in flight) and wait for all."""
        self._prune()
        tasks = [self._launch(pod) for pod in self.registry.all()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        """One round per `interval_s`, its pods' scrapes spread evenly over the round (pod i
        of n at i/n of it), as Prometheus spreads its targets' scrapes: fired together, n
        pages arrive and are parsed at once (a stall of the router's loop n times a parse
        long), and n pods sharing a host render theirs at the same instant. A round that
        fell behind (a stalled loop) starts afresh instead of firing the missed ones in a
        burst."""
        interval = self.settings.interval_s
        loop = asyncio.get_running_loop()
        round_start = loop.time()
        while True:
            self._prune()
            pods = self.registry.all()
            for i, pod in enumerate(pods):
                if i:
                    await _sleep_until(loop, round_start + interval * i / len(pods))
                    if pod.endpoint not in self.registry:
                        continue
                self._launch(pod)
            round_start += interval
            now = loop.time()
            if round_start < now:
                round_start = now
            await _sleep_until(loop, round_start)

    def _launch(self, pod: Pod) -> asyncio.Task[None]:
        task = self._inflight.get(pod.endpoint)
        if task is None:
            task = asyncio.create_task(self._scrape_pod(pod.endpoint))
            self._inflight[pod.endpoint] = task
            task.add_done_callback(lambda _t, ep=pod.endpoint: self._inflight.pop(ep, None))
        return task

    def _prune(self) -> None:
        for ep in [ep for ep in self._states if ep not in self.registry]:
            del self._states[ep]

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.settings.timeout_s,
                limits=httpx.Limits(max_connections=self.settings.concurrency),
            )
        return self._client

    async def _scrape_pod(self, endpoint: str) -> None:
        url = f"http://{endpoint}{self.settings.metrics_path}"
        try:
            async with self._semaphore:
                # One deadline for the whole exchange: httpx's timeouts are per phase, so a
                # server that trickles bytes could otherwise hold the slot far longer.
                async with asyncio.timeout(self.settings.timeout_s):
                    resp = await self._http().get(url)
            resp.raise_for_status()
            snapshot = parse_vllm_metrics(resp.text, now=self._clock())
        except asyncio.CancelledError:
            raise
        except (TimeoutError, httpx.TimeoutException) as exc:
            self.stats.timeouts += 1
            self._failed(endpoint, f"timed out after {self.settings.timeout_s}s ({exc!r})")
        except MetricsParseError as exc:
            self.stats.parse_errors += 1
            self._failed(endpoint, str(exc))
        except (httpx.HTTPError, OSError) as exc:
            self._failed(endpoint, repr(exc))
        except Exception as exc:
            # A client-library bug on an odd connection (anyio's AttributeError on a socket
            # reset right after accept, seen under chaos) is a failed scrape too: escaping, it
            # left the pod's state untouched and asyncio logged "Task exception was never
            # retrieved".
            self._failed(endpoint, f"{type(exc).__name__}: {exc}")
        else:
            self._succeeded(endpoint, snapshot)

    def _state(self, endpoint: str) -> _PodScrapeState:
        state = self._states.get(endpoint)
        if state is None:
            state = self._states[endpoint] = _PodScrapeState()
        return state

    def _succeeded(self, endpoint: str, snapshot: MetricsSnapshot) -> None:
        if endpoint not in self.registry:
            return
        self.stats.scrapes_ok += 1
        state = self._state(endpoint)
        state.consecutive_failures = 0
        pod = self.registry.get(endpoint)
        before = pod.metrics.process_start_time if pod is not None else None
        self.registry.set_metrics(endpoint, snapshot)
        after = snapshot.process_start_time
        if before is not None and after is not None and abs(after - before) > _RESTART_EPSILON_S:
            self.stats.restarts += 1
            reason = f"engine restarted: process start time {before:.0f} -> {after:.0f}"
            log.warning("pod %s %s", endpoint, reason)
            for cb in self._on_restart:
                cb(endpoint, reason)
        for snap_cb in self._on_snapshot:
            snap_cb(endpoint, snapshot)
        if state.held_unhealthy:
            state.held_unhealthy = False
            self.stats.recovered += 1
            self.registry.set_health(endpoint, True)
            log.info("pod %s metrics scrape recovered; marked healthy", endpoint)

    def _failed(self, endpoint: str, reason: str) -> None:
        pod = self.registry.get(endpoint)
        if pod is None:
            return
        self.stats.failures += 1
        state = self._state(endpoint)
        state.consecutive_failures += 1
        if not pod.metrics.stale:
            self.registry.set_metrics(endpoint, dataclasses.replace(pod.metrics, stale=True))
        log.debug("pod %s metrics scrape failed: %s", endpoint, reason)
        if state.consecutive_failures >= self.settings.unhealthy_after and not state.held_unhealthy:
            state.held_unhealthy = True
            self.stats.marked_unhealthy += 1
            was_healthy = pod.healthy
            self.registry.set_health(endpoint, False)
            # One line per state change: a pod the health prober ejected already was logged
            # there.
            log.log(
                logging.WARNING if was_healthy else logging.DEBUG,
                "pod %s marked unhealthy after %d failed metrics scrapes (last: %s)",
                endpoint,
                state.consecutive_failures,
                reason,
            )


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    await asyncio.sleep(max(0.0, when - loop.time()))
