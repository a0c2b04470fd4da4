"""The pod's Prometheus page: vLLM's metric names, labels and buckets, fed by the engine model.

Gauges and token counters are read from `Engine.metrics()` at scrape time; latency histograms
are observed by the driver as tokens reach clients. Latencies are in emulated seconds (what the
modelled GPU would show; divide by the pod's speedup for wall time). Labels: `model_name` and
`engine` ("0"). `old_names` adds the deprecated names older vLLM releases expose, which some
scrapers still read: `vllm:gpu_cache_usage_perc`, `vllm:gpu_prefix_cache_queries/hits`,
`vllm:time_per_output_token_seconds`.

Emulator-only metrics use the `kvroute_emulator_` prefix (a scraper ignores what it does not
know, as vLLM's scrapers must).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.emulator.driver import DriverObserver, Generation
from router.sim.engine import Engine, FinishedRequest

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
#: Wall seconds a step's tokens are handed over late; 2 ms (a benchmark's validity bound) is an
#: edge, so "p99 <= 2 ms" reads exactly off the counts.
STEP_LAG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 1.0)  # fmt: skip
LABELS = ("model_name", "engine")


class PodMetrics(DriverObserver):
    """Owns the pod's registry; `render()` is the `/metrics` body."""

    def __init__(
        self,
        engine: Engine,
        model: str,
        *,
        max_loras: int,
        old_names: bool = False,
        waiting_extra: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._engine = engine
        self._model = model
        self._max_loras = max_loras
        self._old = old_names
        self._waiting_extra = waiting_extra
        self.registry.register(_EngineCollector(self))
        labels = (model, "0")
        reg = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, registry=reg, buckets=buckets).labels(*labels)

        self.ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.tpot = (
            hist(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds. DEPRECATED: Use "
                "vllm:inter_token_latency_seconds instead.",
                ITL_BUCKETS,
            )
            if old_names
            else None
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=reg,
        )
        self.remote_prefill_fallbacks = Counter(
            "kvroute_emulator_remote_prefill_fallbacks",
            "Decode requests with kv_transfer_params served by local prefill, by reason.",
            ("reason",),
            registry=reg,
        )
        self.kv_pulls = Counter(
            "kvroute_emulator_kv_pulls",
            "Remote-prefill KV pulls that succeeded (decode role).",
            registry=reg,
        )
        self.kv_pins_expired = Counter(
            "kvroute_emulator_kv_pins_expired",
            "Prefill requests whose pinned blocks timed out before a decode pod pulled them.",
            registry=reg,
        )
        self.faults = Counter(
            "kvroute_emulator_faults_injected", "Faults injected, by kind.", ("kind",), registry=reg
        )
        self.step_lags = Histogram(
            "kvroute_emulator_step_lag_seconds",
            "Wall seconds the driver handed a step's tokens over after the step's end deadline.",
            registry=reg,
            buckets=STEP_LAG_BUCKETS,
        )
        self.lag_jumps: Callable[[], int] = lambda: 0

    # ------------------------------------------------------------ observer hooks
    def first_token(self, gen: Generation, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def tokens(self, gen: Generation, count: int, gap_s: float) -> None:
        for _ in range(count):
            self.itl.observe(gap_s)
            if self.tpot is not None:
                self.tpot.observe(gap_s)

    def finished(self, gen: Generation, fin: FinishedRequest, e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        self.queue.observe(max(0.0, fin.scheduled_at - fin.arrival))
        self.success.labels(self._model, "0", gen.plan.finish_reason).inc()

    def step_lag(self, lag_wall_s: float) -> None:
        self.step_lags.observe(lag_wall_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Scrape-time gauges and counters read from the engine."""

    def __init__(self, owner: PodMetrics) -> None:
        self._o = owner

    def collect(self) -> Iterator[Metric]:
        o = self._o
        m = o._engine.metrics()
        cfg = o._engine.config
        labels = [o._model, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(labels, value)
            return c

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", m.running
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            m.waiting + o._waiting_extra(),
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            m.kv_utilization,
        )
        if o._old:
            yield gauge(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED.",
                m.kv_utilization,
            )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_cache_hits,
        )
        if o._old:
            yield counter(
                "vllm:gpu_prefix_cache_queries",
                "GPU prefix cache queries, in terms of number of queried tokens. DEPRECATED.",
                m.prefix_cache_queries,
            )
            yield counter(
                "vllm:gpu_prefix_cache_hits",
                "GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED.",
                m.prefix_cache_hits,
            )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            m.preemptions,
        )
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
        )
        lora.add_metric(
            [
                str(o._max_loras),
                ",".join(sorted(m.waiting_adapters)),
                ",".join(sorted(m.running_adapters)),
            ],
            time.time(),
        )
        yield lora
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=(
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "num_cpu_blocks",
                "num_gpu_blocks",
                "engine",
            ),
        )
        info.add_metric(
            [
                str(cfg.block_size),
                "auto",
                str(cfg.enable_prefix_caching),
                str(cfg.num_cpu_blocks),
                str(cfg.num_gpu_blocks),
                "0",
            ],
            1.0,
        )
        yield info
        jumps = CounterMetricFamily(
            "kvroute_emulator_driver_lag_jumps",
            "Times the engine clock jumped because the driver fell behind the wall clock.",
        )
        jumps.add_metric([], o.lag_jumps())
        yield jumps
