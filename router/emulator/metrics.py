"""The pod's Prometheus page: vLLM's metric names, labels and buckets, fed by the engine model.

Gauges and token counters are read from `Engine.metrics()` at scrape time; latency histograms
are observed by the driver as tokens reach clients. Latencies are in emulated seconds (what the
modelled GPU would show; divide by the pod's speedup for wall time). Labels: `model_name` and
`engine` ("0"). `old_names` adds the deprecated names older vLLM releases expose, which some
scrapers still read: `vllm:gpu_cache_usage_perc`, `vllm:gpu_prefix_cache_queries/hits`,
`vllm:time_per_output_token_seconds`.

Families, types, label names and enumerated label values follow vLLM 0.32 (checked against a
real engine by `tests/real_vllm/test_emulator_parity.py`), except the MFU estimates
(`vllm:estimated_*_per_gpu`) and `vllm:iteration_tokens_total` (README, "Emulator vs vLLM").
Per-request histograms (prefill, decode, inference time, token counts) are observed when a
request finishes; token-source counters split each prompt into tokens computed, found in the
prefix cache and pulled from a prefill pod. `vllm:lora_requests_info` is exposed only when the
pod serves LoRA adapters (`lora_enabled`), as vLLM's.

Emulator-only metrics use the `kvroute_emulator_` prefix (a scraper ignores what it does not
know, as vLLM's scrapers must).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.emulator.driver import DriverObserver, Generation
from router.emulator.exposition import CounterFamily, HistogramFamily, MetricsText
from router.sim.engine import Engine, EngineConfig, EngineMetrics, FinishedRequest

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
#: vLLM's 1-2-5 buckets for token counts (up to a large context).
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5))
N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
PREEMPTION_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHED_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")


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
        self.text = MetricsText()
        self._engine = engine
        self._model = model
        self._max_loras = max_loras
        self._old = old_names
        self._waiting_extra = waiting_extra
        #: Expose vllm:lora_requests_info (vLLM does only with --enable-lora).
        self.lora_enabled = False
        #: Token counters by source, summed as requests finish.
        self.prompt_by_source = dict.fromkeys(PROMPT_SOURCES, 0)
        self.cached_by_source = dict.fromkeys(CACHED_SOURCES, 0)
        self.external_queries = 0
        self.external_hits = 0
        self.text.add(_EngineCollector(self))
        labels = (model, "0")
        reg = self.text

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            family = HistogramFamily(name, doc, LABELS, buckets)
            reg.add(family)
            return family.labels(*labels)

        def counter(name: str, doc: str, labelnames: tuple[str, ...] = ()) -> CounterFamily:
            family = CounterFamily(name, doc, labelnames)
            reg.add(family)
            return family

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
        self.success = counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
        )
        for reason in FINISHED_REASONS:
            self.success.labels(model, "0", reason)
        self.prompt_hist = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS
        )
        self.generation_hist = hist(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            TOKEN_BUCKETS,
        )
        self.max_generation_hist = hist(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            TOKEN_BUCKETS,
        )
        self.params_n = hist(
            "vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS
        )
        self.params_max_tokens = hist(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            TOKEN_BUCKETS,
        )
        self.request_tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.inference_time = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill_time = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode_time = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_preemptions = hist(
            "vllm:request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            PREEMPTION_BUCKETS,
        )
        self.prefill_computed = hist(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            TOKEN_BUCKETS,
        )
        self.remote_prefill_fallbacks = counter(
            "kvroute_emulator_remote_prefill_fallbacks",
            "Decode requests with kv_transfer_params served by local prefill, by reason.",
            ("reason",),
        )
        self.kv_pulls = counter(
            "kvroute_emulator_kv_pulls", "Remote-prefill KV pulls that succeeded (decode role)."
        )
        self.kv_pins_expired = counter(
            "kvroute_emulator_kv_pins_expired",
            "Prefill requests whose pinned blocks timed out before a decode pod pulled them.",
        )
        self.faults = counter(
            "kvroute_emulator_faults_injected", "Faults injected, by kind.", ("kind",)
        )
        step_lags = HistogramFamily(
            "kvroute_emulator_step_lag_seconds",
            "Wall seconds the driver handed a step's tokens over after the step's end deadline.",
            (),
            STEP_LAG_BUCKETS,
        )
        reg.add(step_lags)
        self.step_lags = step_lags.labels()
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
        cached = min(fin.cached_tokens, fin.prompt_tokens)
        pulled = min(fin.transferred_tokens, fin.prompt_tokens - cached)
        computed = fin.prompt_tokens - cached - pulled
        self.prompt_by_source["local_compute"] += computed
        self.prompt_by_source["local_cache_hit"] += cached
        self.prompt_by_source["external_kv_transfer"] += pulled
        self.cached_by_source["device"] += cached
        self.cached_by_source["p2p"] += pulled
        if gen.sim.kv_source is not None:
            self.external_queries += fin.prompt_tokens
            self.external_hits += pulled
        self.prompt_hist.observe(fin.prompt_tokens)
        self.generation_hist.observe(fin.output_tokens)
        self.max_generation_hist.observe(gen.plan.num_tokens)
        self.params_max_tokens.observe(gen.plan.num_tokens)
        if gen.index == 0:
            self.params_n.observe(len(gen.job.generations))
        self.request_tpot.observe(fin.tpot)
        self.inference_time.observe(max(0.0, fin.finished_at - fin.scheduled_at))
        self.prefill_time.observe(max(0.0, fin.first_token_at - fin.scheduled_at))
        self.decode_time.observe(max(0.0, fin.finished_at - fin.first_token_at))
        self.request_preemptions.observe(fin.preemptions)
        self.prefill_computed.observe(computed)

    def step_lag(self, lag_wall_s: float) -> None:
        self.step_lags.observe(lag_wall_s)

    def render(self) -> bytes:
        return self.text.render()


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
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints.",
            labels=(*LABELS, "reason"),
        )
        by_reason.add_metric([*labels, "capacity"], m.waiting + o._waiting_extra())
        by_reason.add_metric([*labels, "deferred"], 0)
        yield by_reason
        sleep = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.",
            labels=(*LABELS, "sleep_state"),
        )
        for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.add_metric([*labels, state], value)
        yield sleep
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
        yield counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in "
            "terms of number of queried tokens.",
            o.external_queries,
        )
        yield counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in "
            "terms of number of cached tokens.",
            o.external_hits,
        )
        # No multimodal inputs here: the counters exist (dashboards query them) and stay 0.
        yield counter(
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
            0,
        )
        yield counter(
            "vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", 0
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        by_source = CounterMetricFamily(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            labels=(*LABELS, "source"),
        )
        for source, value in o.prompt_by_source.items():
            by_source.add_metric([*labels, source], value)
        yield by_source
        yield counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            sum(o.cached_by_source.values()),
        )
        cached_by = CounterMetricFamily(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them.",
            labels=(*LABELS, "source"),
        )
        for source, value in o.cached_by_source.items():
            cached_by.add_metric([*labels, source], value)
        yield cached_by
        rejections = CounterMetricFamily(
            "vllm:admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            labels=("model_name", "reason"),
        )
        for reason in ("max_num_queued_reqs", "max_num_queued_tokens"):
            rejections.add_metric([o._model, reason], 0)
        yield rejections
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            m.preemptions,
        )
        if o.lora_enabled:
            yield _lora_info(o, m)
        yield _cache_config_info(cfg)
        jumps = CounterMetricFamily(
            "kvroute_emulator_driver_lag_jumps",
            "Times the engine clock jumped because the driver fell behind the wall clock.",
        )
        jumps.add_metric([], o.lag_jumps())
        yield jumps


def _lora_info(o: PodMetrics, m: EngineMetrics) -> Metric:
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
    return lora


def _cache_config_info(cfg: EngineConfig) -> Metric:
    """vLLM's CacheConfig as labels (value 1): the engine model's own values where it has
    them, vLLM's defaults for a plain decoder elsewhere."""
    labels = {
        "_block_size_resolved": "True",
        "block_size": str(cfg.block_size),
        "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None",
        "effective_attention_block_size": str(cfg.block_size),
        "enable_mamba_shared_prefix_checkpoint": "False",
        "enable_prefix_caching": str(cfg.enable_prefix_caching),
        "engine": "0",
        "gpu_memory_utilization": "0.9",
        "hash_block_size": "None",
        "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_layout": "None",
        "kv_cache_max_concurrency": "None",
        "kv_cache_memory_bytes": "None",
        "kv_cache_size_tokens": str(cfg.num_gpu_blocks * cfg.block_size),
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "auto",
        "num_cpu_blocks": str(cfg.num_cpu_blocks),
        "num_gpu_blocks": str(cfg.num_gpu_blocks),
        "num_gpu_blocks_override": "None",
        "prefix_cache_retention_interval": "0",
        "prefix_caching_hash_algo": "sha256",
        "prefix_match_unit": "None",
        "replayssm_buffer_len": "16",
        "skip_page_size_padded": "None",
        "sliding_window": "None",
        "swa_bounded_replay": "True",
        "use_kda_recoverssm": "False",
        "use_replayssm": "False",
        "user_specified_block_size": "True",
    }
    info = GaugeMetricFamily(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        labels=tuple(labels),
    )
    info.add_metric(list(labels.values()), 1.0)
    return info
