"""Step-time model of one vLLM engine step: a per-step roofline of the model on its GPUs.

Owns the hardware/model profiles (`Profile`, loaded from YAML by `load_profile`) and
`LatencyModel.step_time`, which the engine calls once per scheduled step with aggregate batch
figures (never per token). Each term is a roofline with efficiency factors fitted to measured
H100 kernels (`router.sim.calibration`, printed by `benchmarks/calibrate_latency.py`):

- linear layers, per layer and per GPU shard (TP), for M batched tokens:
  ``kernel_latency + max(2·M·K·N / (peak·gemm_compute), (K·N·w + M·(K+N)·a) / (hbm·gemm_memory))``
  — flat (weight-read bound) for small M, compute bound for large M; MoE experts read only the
  experts the batch touches (``E·(1-(1-k/E)^M)`` of them);
- attention, one fused kernel per layer: ``attention_latency`` + query·key FLOPs of the prefill
  chunks (causal over cached + new context) / (peak·attention_compute) + KV bytes read (decode
  contexts and prefill contexts) / (hbm·attention_memory); sliding-window layers cap the context;
- norms, rotary, activations: ``elementwise_passes`` hidden-sized reads+writes per token and layer;
- logits: the lm_head GEMM for the rows that sample a token;
- tensor parallelism: two all-reduces of M·hidden activations per layer over NVLink;
- chunked prefill: a step that carries a prefill chunk (a query of more than one token) is not
  a uniform decode batch, so vLLM replays only piecewise CUDA graphs for it and runs attention
  eagerly, ``mixed_batch_layer_latency_s`` per layer; a decode step that shares its batch with
  a prefill chunk therefore pays the chunk's tokens in the GEMMs and attention *and* this;
- a constant per-step overhead of the engine (``step_overhead_s``: scheduling, input
  preparation, sampling, the GPU→CPU sync of the sampled tokens).

The model does no I/O beyond reading a profile file and imports nothing from the faces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Transformer shape (values from the model's Hugging Face config.json)."""

    name: str
    params: float  # total parameters
    active_params: float  # parameters used per token (= params for dense models)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width, or one expert's width for MoE
    vocab: int
    weight_bytes: float  # bytes per parameter of the linear layers (bf16 2, fp8 1, mxfp4 ~0.53)
    kv_bytes: float = 2.0  # bytes per KV-cache element
    activation_bytes: float = 2.0
    experts: int = 0  # routed experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    other_weight_bytes: float = 2.0  # bytes per param outside the experts (MoE attention etc.)
    embedding_bytes: float = 2.0  # input embedding and lm_head stay bf16 in FP8/FP4 checkpoints
    sliding_window: int = 0  # tokens of the sliding-window layers (0 = none)
    sliding_layers: int = 0  # how many of the layers use the sliding window

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of every layer and KV head for one token (whole model, all TP shards)."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes

    @property
    def weight_bytes_total(self) -> float:
        """Bytes of all weights (whole model, all TP shards); embedding and lm_head untied."""
        embed = 2 * self.vocab * self.hidden
        if not self.experts:
            return (self.params - embed) * self.weight_bytes + embed * self.embedding_bytes
        expert = self.layers * self.experts * 3 * self.hidden * self.intermediate
        other = self.params - expert - embed
        return (
            expert * self.weight_bytes
            + other * self.other_weight_bytes
            + embed * self.embedding_bytes
        )


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU (datasheet values)."""

    name: str
    peak_flops: float  # dense FLOP/s at the linear layers' dtype
    attention_peak_flops: float  # dense bf16 FLOP/s (attention runs in bf16)
    hbm_bandwidth: float  # bytes/s
    memory_bytes: float  # usable device memory as the driver reports it
    interconnect_bandwidth: float  # NVLink bytes/s per direction per GPU


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fractions of peak the kernels reach, and fixed latencies (fitted; see module doc)."""

    gemm_compute: float = 0.72
    gemm_memory: float = 0.80
    attention_compute: float = 0.60
    attention_memory: float = 0.85
    kernel_latency_s: float = 12e-6
    attention_latency_s: float = 35e-6
    elementwise_passes: float = 40.0
    allreduce_latency_s: float = 10e-6
    step_overhead_s: float = 0.5e-3
    #: Per layer, extra time of a step that is not a uniform decode batch (see module doc).
    mixed_batch_layer_latency_s: float = 13e-6


@dataclass(frozen=True, slots=True)
class Profile:
    """A model served on `tp` GPUs of one kind: everything the engine model needs."""

    name: str
    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1
    efficiency: Efficiency = Efficiency()
    gpu_memory_utilization: float = 0.90
    #: Activation peak + CUDA graphs + NCCL buffers per GPU, kept out of the KV cache.
    reserved_bytes_per_gpu: float = 4e9
    block_size: int = 16
    #: Given explicitly, this wins over the memory-derived value.
    num_gpu_blocks_override: int | None = None
    #: Host↔GPU copy bandwidth for the CPU KV tier (PCIe), bytes/s.
    cpu_offload_bandwidth: float = 25e9
    #: CPU KV tier of the pod, GiB of host memory summed over its TP ranks (0 = no CPU tier);
    #: as vLLM's `--kv-offloading-size`. Blocks evicted from GPU move here and reload on a hit.
    cpu_kv_cache_gib: float = 0.0
    #: P/D: the KV link a decode pod pulls a prompt's blocks over from a prefill pod (NIXL):
    #: a fixed latency per transfer, and bytes/s (transfers on one pod pair are serialised).
    kv_link_latency_s: float = 0.002
    kv_link_bandwidth: float = 25e9

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model.kv_bytes_per_token

    @property
    def kv_bytes_per_block(self) -> float:
        return self.model.kv_bytes_per_token * self.block_size

    @property
    def num_gpu_blocks(self) -> int:
        """KV blocks of the pod: (util·memory − weights/TP − reserve) per GPU over block bytes."""
        if self.num_gpu_blocks_override is not None:
            return self.num_gpu_blocks_override
        per_gpu = (
            self.gpu.memory_bytes * self.gpu_memory_utilization
            - self.model.weight_bytes_total / self.tp
            - self.reserved_bytes_per_gpu
        )
        if per_gpu <= 0:
            raise ValueError(f"profile {self.name}: weights do not fit in GPU memory")
        return int(per_gpu // (self.kv_bytes_per_block / self.tp))

    @property
    def num_cpu_blocks(self) -> int:
        """KV blocks of the pod's CPU tier: `cpu_kv_cache_gib` over the bytes of one block of
        all TP shards (each rank keeps its shard of every block, as on GPU)."""
        return int(self.cpu_kv_cache_gib * 2**30 // self.kv_bytes_per_block)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    types = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    values = {k: _coerce(v, types[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """Numbers from YAML: PyYAML reads `85.0e9` (no exponent sign) as a string."""
    if value is None or type_name not in ("float", "int", "float | None", "int | None"):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if type_name.startswith("int"):
        if num != int(num):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(num)
    return num


def profile_from_dict(data: dict[str, Any], where: str = "profile") -> Profile:
    """Build a `Profile` from a parsed YAML mapping; unknown fields are an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping at the top level")
    body = dict(data)
    for key in ("model", "gpu"):
        if key not in body:
            raise ValueError(f"{where}: missing section '{key}'")
    body["model"] = _build(ModelSpec, body["model"], f"{where}: model")
    body["gpu"] = _build(GpuSpec, body["gpu"], f"{where}: gpu")
    body["efficiency"] = _build(Efficiency, body.get("efficiency", {}), f"{where}: efficiency")
    if "num_gpu_blocks" in body:
        body["num_gpu_blocks_override"] = body.pop("num_gpu_blocks")
    profile = _build(Profile, body, where)
    if profile.tp < 1 or profile.block_size < 1:
        raise ValueError(f"{where}: tp and block_size must be ≥ 1")
    if not (profile.kv_link_latency_s >= 0 and profile.kv_link_bandwidth > 0):
        raise ValueError(f"{where}: kv_link_latency_s must be ≥ 0 and kv_link_bandwidth > 0")
    if not (math.isfinite(profile.cpu_kv_cache_gib) and profile.cpu_kv_cache_gib >= 0):
        raise ValueError(f"{where}: cpu_kv_cache_gib must be a number of GiB ≥ 0 (0 = no CPU tier)")
    if not profile.cpu_offload_bandwidth > 0:
        raise ValueError(f"{where}: cpu_offload_bandwidth must be > 0 bytes/s")
    return profile


def _profile_dir() -> Any:
    # Package data of `router` (pyproject: "sim/profiles/*.yaml"); `router.sim` is a regular
    # package, so this works from a checkout, a wheel or a zip.
    return resources.files("router.sim").joinpath("profiles")


def bundled_profiles() -> list[str]:
    """Names of the profiles shipped in `router/sim/profiles/`."""
    return sorted(
        p.name[: -len(".yaml")] for p in _profile_dir().iterdir() if p.name.endswith(".yaml")
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a bundled profile by name (e.g. "llama-3.1-8b-h100") or a user YAML file by path."""
    text: str
    where = str(name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ValueError(f"profile file not found: {path}")
        text = path.read_text()
    else:
        res = _profile_dir().joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise ValueError(
                f"unknown profile {name_or_path!r}; bundled: {', '.join(bundled_profiles())}"
            )
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: invalid YAML: {exc}") from None
    return profile_from_dict(data, where)


class LatencyModel:
    """Step time of an engine step from aggregate batch figures.

    `step_time` is called once per step; the token-count-dependent linear cost is memoised per
    M, so a step costs a few float operations.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        m, g, e, tp = profile.model, profile.gpu, profile.efficiency, profile.tp
        self._gemm_flops = g.peak_flops * e.gemm_compute
        self._gemm_bw = g.hbm_bandwidth * e.gemm_memory
        self._attn_flops = g.attention_peak_flops * e.attention_compute
        self._attn_bw = g.hbm_bandwidth * e.attention_memory
        q_width = m.heads * m.head_dim
        kv_width = m.kv_heads * m.head_dim
        self._dense_wb = m.other_weight_bytes if m.experts else m.weight_bytes
        # (K, N) of each per-layer linear on one TP shard.
        self._linears: list[tuple[float, float]] = [
            (m.hidden, (q_width + 2 * kv_width) / tp),  # qkv
            (q_width / tp, m.hidden),  # o
        ]
        if not m.experts:
            self._linears += [
                (m.hidden, 2 * m.intermediate / tp),  # gate_up
                (m.intermediate / tp, m.hidden),  # down
            ]
        self._lm_head = (m.hidden, m.vocab / tp)
        # Attention: FLOPs per query-key pair per layer (QKᵀ and PV, 2 FLOPs per MAC).
        self._attn_flops_per_pair = 4.0 * m.heads / tp * m.head_dim
        self._kv_bytes_per_token_layer = 2.0 * m.kv_heads / tp * m.head_dim * m.kv_bytes
        self._full_layers = m.layers - m.sliding_layers
        self._linear_cache: dict[int, float] = {}
        self._logits_cache: dict[int, float] = {}

    # ---------------------------------------------------------------- parts
    def gemm_time(self, m_tokens: int, k: float, n: float, weight_bytes: float) -> float:
        """One GEMM of M tokens × (K, N) weights: launch + roofline max(compute, memory)."""
        e = self.profile.efficiency
        a = self.profile.model.activation_bytes
        compute = 2.0 * m_tokens * k * n / self._gemm_flops
        memory = (k * n * weight_bytes + m_tokens * (k + n) * a) / self._gemm_bw
        return e.kernel_latency_s + max(compute, memory)

    def moe_time(self, m_tokens: int) -> float:
        """Routed experts of one layer for M tokens (gate_up + down of the touched experts)."""
        md = self.profile.model
        if not md.experts or m_tokens <= 0:
            return 0.0
        tp = self.profile.tp
        e = self.profile.efficiency
        k_frac = md.experts_per_token / md.experts
        touched = md.experts * (1.0 - (1.0 - k_frac) ** m_tokens)
        expert_params = 3.0 * md.hidden * md.intermediate / tp
        flops = 2.0 * m_tokens * md.experts_per_token * expert_params
        weight = touched * expert_params * md.weight_bytes
        acts = m_tokens * md.experts_per_token * (2 * md.hidden + 3 * md.intermediate / tp)
        memory = (weight + acts * md.activation_bytes) / self._gemm_bw
        return 2 * e.kernel_latency_s + max(flops / self._gemm_flops, memory)

    def linear_layer_time(self, m_tokens: int) -> float:
        """All linear layers of one transformer layer (attention projections + MLP/MoE)."""
        t = 0.0
        for k, n in self._linears:
            t += self.gemm_time(m_tokens, k, n, self._dense_wb)
        return t + self.moe_time(m_tokens)

    def attention_time(
        self,
        prefill_pairs: float,
        kv_read_tokens: float,
        window_pairs: float | None = None,
        window_read_tokens: float | None = None,
    ) -> float:
        """Attention of all layers: one kernel per layer over a mixed prefill/decode batch.

        `prefill_pairs`: Σ over prefill chunks of new·(cached + (new+1)/2) query-key pairs;
        `kv_read_tokens`: context tokens whose K/V are read (decode contexts + prefill contexts);
        `window_pairs` / `window_read_tokens`: the same with every context capped at the
        sliding window, for the sliding-window layers (None = same as the full figures).
        """
        md = self.profile.model
        lat = self.profile.efficiency.attention_latency_s
        fpp = self._attn_flops_per_pair / self._attn_flops
        bpt = self._kv_bytes_per_token_layer / self._attn_bw
        t = self._full_layers * (lat + prefill_pairs * fpp + kv_read_tokens * bpt)
        if md.sliding_layers:
            wp = prefill_pairs if window_pairs is None else window_pairs
            wr = kv_read_tokens if window_read_tokens is None else window_read_tokens
            t += md.sliding_layers * (lat + wp * fpp + wr * bpt)
        return t

    def elementwise_time(self, m_tokens: int) -> float:
        """Norms, rotary, activation functions, residual adds: memory-bound passes."""
        md = self.profile.model
        e = self.profile.efficiency
        per_layer = e.elementwise_passes * m_tokens * md.hidden * md.activation_bytes
        return md.layers * per_layer / self._gemm_bw

    def allreduce_time(self, m_tokens: int) -> float:
        """Two ring all-reduces of M·hidden activations per layer (0 at TP1)."""
        tp = self.profile.tp
        if tp == 1 or m_tokens <= 0:
            return 0.0
        md = self.profile.model
        e = self.profile.efficiency
        nbytes = m_tokens * md.hidden * md.activation_bytes
        one = e.allreduce_latency_s + 2.0 * (tp - 1) / tp * nbytes / (
            self.profile.gpu.interconnect_bandwidth
        )
        return 2 * md.layers * one

    def logits_time(self, rows: int) -> float:
        """The lm_head GEMM for the rows that sample a token."""
        if rows <= 0:
            return 0.0
        t = self._logits_cache.get(rows)
        if t is None:
            k, n = self._lm_head
            t = self.gemm_time(rows, k, n, self.profile.model.embedding_bytes)
            self._logits_cache[rows] = t
        return t

    def token_time(self, m_tokens: int) -> float:
        """Everything that depends only on the batched token count (memoised per M)."""
        t = self._linear_cache.get(m_tokens)
        if t is None:
            t = (
                self.profile.model.layers * self.linear_layer_time(m_tokens)
                + self.elementwise_time(m_tokens)
                + self.allreduce_time(m_tokens)
            )
            self._linear_cache[m_tokens] = t
        return t

    # ----------------------------------------------------------------- step
    def step_time(
        self,
        num_tokens: int,
        num_logits: int,
        prefill_pairs: float = 0.0,
        kv_read_tokens: float = 0.0,
        window_pairs: float | None = None,
        window_read_tokens: float | None = None,
        mixed: bool = False,
    ) -> float:
        """Seconds of one engine step.

        num_tokens: tokens in the batch (decode tokens + prefill chunk tokens);
        num_logits: rows that sample (decode requests + prefills that finish their prompt);
        mixed: the batch holds a prefill chunk of more than one token (piecewise CUDA graphs);
        the rest: see `attention_time`.
        """
        if num_tokens <= 0:
            return 0.0
        t = (
            self.token_time(num_tokens)
            + self.attention_time(prefill_pairs, kv_read_tokens, window_pairs, window_read_tokens)
            + self.logits_time(num_logits)
            + self.profile.efficiency.step_overhead_s
        )
        return t + self.mixed_batch_time() if mixed else t

    def mixed_batch_time(self) -> float:
        """What a step with a prefill chunk pays on top of its roofline: eager attention."""
        e = self.profile.efficiency
        return self.profile.model.layers * e.mixed_batch_layer_latency_s

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0, logits: int = 1) -> float:
        """One request's prompt chunk in one step (an estimate; also used by calibration)."""
        ctx = cached_tokens + new_tokens
        pairs = new_tokens * (cached_tokens + (new_tokens + 1) / 2.0)
        sw = self.profile.model.sliding_window
        wp = wr = None
        if sw:
            wp = new_tokens * min(ctx, sw)
            wr = min(ctx, sw)
        return self.step_time(new_tokens, logits, pairs, ctx, wp, wr, mixed=new_tokens > 1)

    def decode_step_time(self, batch: int, context: int) -> float:
        """A pure decode step of `batch` requests each attending `context` tokens."""
        sw = self.profile.model.sliding_window
        wr = batch * min(context, sw) if sw else None
        return self.step_time(batch, batch, 0.0, batch * context, None, wr)

    def transfer_time_cpu(self, num_blocks: int) -> float:
        """Reloading `num_blocks` KV blocks from the CPU tier over PCIe (per GPU shard)."""
        if num_blocks <= 0:
            return 0.0
        per_gpu = self.profile.kv_bytes_per_block / self.profile.tp
        return num_blocks * per_gpu / self.profile.cpu_offload_bandwidth
