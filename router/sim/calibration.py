"""Latency model vs measured H100 kernels: the comparison behind the profiles' efficiency factors.

Owns the mapping from the measured file (`benchmarks/data/h100-bf16.json`, a copy of the
team's gpu-profile measurements) to model predictions, building block by building block:
per-layer GEMMs by token count (Llama-3.1-8B TP1 and one TP4 shard of Llama-3.3-70B, both
bf16), the lm_head, prefill attention (flash kernel with no cached prefix; the cached-prefix
cases used a masked kernel and are upper bounds), decode attention, whole-model prefill
(transformers eager, logits for every position) and a decode step assembled from the measured
parts. `benchmarks/calibrate_latency.py` prints the table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from router.sim.latency import LatencyModel, Profile, load_profile

EIGHT_B = "llama-3.1-8b-tp1"
SEVENTY_B_TP4 = "llama-3.3-70b-tp4"
_GEMM_OPS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True, slots=True)
class Row:
    group: str
    name: str
    measured_ms: float
    model_ms: float
    #: True for measurements that are upper bounds (the model should not exceed them).
    upper_bound: bool = False

    @property
    def error(self) -> float:
        """Signed relative error of the model (model / measured − 1)."""
        return self.model_ms / self.measured_ms - 1.0


def bf16_variant(profile: Profile) -> Profile:
    """The profile's model with bf16 weights on bf16 peak (what was measured for the 70B)."""
    model = replace(profile.model, weight_bytes=2.0, embedding_bytes=2.0)
    gpu = replace(profile.gpu, peak_flops=profile.gpu.attention_peak_flops)
    eff = profile.efficiency
    if profile.name.startswith("llama-3.3-70b"):
        # Fitted on bf16; the FP8 profile lowers only gemm_compute.
        eff = replace(eff, gemm_compute=load_profile("llama-3.1-8b-h100").efficiency.gemm_compute)
    return replace(profile, model=model, gpu=gpu, efficiency=eff)


def _gemm_shapes(lm: LatencyModel) -> dict[str, tuple[float, float]]:
    return dict(zip(_GEMM_OPS, lm._linears, strict=True))


def _per_layer_attention(lm: LatencyModel, pairs: float, read: float) -> float:
    return lm.attention_time(pairs, read) / lm.profile.model.layers


def compare(measured: dict[str, Any]) -> list[Row]:
    """Every measured figure next to the model's prediction (milliseconds)."""
    rows: list[Row] = []
    models = {
        EIGHT_B: LatencyModel(load_profile("llama-3.1-8b-h100")),
        SEVENTY_B_TP4: LatencyModel(bf16_variant(load_profile("llama-3.3-70b-fp8-h100-tp4"))),
    }
    for key, lm in models.items():
        shapes = _gemm_shapes(lm)
        for m_str, ops in measured["gemm_ms"][key].items():
            if m_str == "lm_head":
                for m2, ms in ops.items():
                    rows.append(Row(f"lm_head {key}", f"M={m2}", ms, lm.logits_time(int(m2)) * 1e3))
                continue
            m = int(m_str)
            for op in _GEMM_OPS:
                k, n = shapes[op]
                pred = lm.gemm_time(m, k, n, 2.0) * 1e3
                rows.append(Row(f"gemm {key}", f"{op} M={m}", ops[op], pred))
        for name, ms in measured["attn_prefill_ms"][key].items():
            new, cached = (int(x[1:]) for x in name.split("_"))
            pairs = new * (cached + (new + 1) / 2.0)
            pred = _per_layer_attention(lm, pairs, cached + new) * 1e3
            group = f"attn prefill {key}" + (" (masked, upper bound)" if cached else "")
            rows.append(Row(group, name, ms, pred, upper_bound=cached > 0))
        for name, ms in measured["attn_decode_ms"][key].items():
            batch, ctx = (int(x[1:]) for x in name.split("_"))
            pred = _per_layer_attention(lm, 0.0, batch * ctx) * 1e3
            rows.append(Row(f"attn decode {key}", name, ms, pred))

    lm8 = models[EIGHT_B]
    for name, ms in measured["hf_llama8b_ms"].items():
        if not name.startswith("prefill_L"):
            continue  # the eager decode figures are Python-bound (see the data README)
        tokens = int(name[len("prefill_L") :])
        # transformers computes logits for every position; no vLLM step overhead, and eager
        # kernels everywhere (the model's GEMM/attention floors are eager already).
        vllm_only = lm8.profile.efficiency.step_overhead_s + lm8.mixed_batch_time()
        pred = lm8.prefill_time(tokens, logits=tokens) - vllm_only
        rows.append(Row("whole-model prefill (HF eager)", f"L={tokens}", ms, pred * 1e3))
    rows.extend(_decode_from_parts(measured, lm8))
    return rows


def _decode_from_parts(measured: dict[str, Any], lm: LatencyModel) -> list[Row]:
    """A decode step = layers × (GEMMs at M=batch + decode attention) + lm_head, measured."""
    out = []
    layers = lm.profile.model.layers
    gemm = measured["gemm_ms"][EIGHT_B]
    for batch, ctx in ((1, 2048), (64, 2048)):
        attn = measured["attn_decode_ms"][EIGHT_B][f"B{batch}_C{ctx}"]
        head = gemm["lm_head"].get(str(batch), gemm["lm_head"]["128"])
        parts = layers * (sum(gemm[str(batch)][op] for op in _GEMM_OPS) + attn) + head
        pred = lm.decode_step_time(batch, ctx) - lm.profile.efficiency.step_overhead_s
        out.append(Row("decode step from parts", f"B={batch} C={ctx}", parts, pred * 1e3))
    return out


def summarize(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per group: median and max absolute relative error, and the row count."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(abs(r.error))
    return {
        g: {"median_abs_error": statistics.median(v), "max_abs_error": max(v), "n": len(v)}
        for g, v in groups.items()
    }
