"""Engine model: block accounting, prefix reuse, LRU eviction, preemption, chunked prefill,
CPU tier, KV events vs cache state, P/D transfer, step fusion."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.blocks import token_block_keys
from router.events.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.index import BlockIndex, Tier
from router.pods import Role
from router.sim.engine import (
    Engine,
    EngineConfig,
    FinishedRequest,
    KVLink,
    SimRequest,
    StepOutcome,
)
from router.sim.latency import LatencyModel, load_profile

BS = 16
LM = LatencyModel(load_profile("llama-3.1-8b-h100"))


class Replayer:
    """Feeds an engine's KV events into a BlockIndex the way the event ingester does."""

    def __init__(self, pod: str = "e0", seed: int = 0) -> None:
        self.pod = pod
        self.seed = seed
        self.index = BlockIndex()
        self.events: list[KVEvent] = []
        self.times: list[float] = []

    def __call__(self, events: list[KVEvent], ts: float) -> None:
        self.times.append(ts)
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, BlockStored):
                parent = None
                if ev.parent_block_hash is not None:
                    parent = self.index.engine_key(self.pod, ev.parent_block_hash)
                    assert parent is not None, "BlockStored with an unknown parent"
                keys = token_block_keys(
                    ev.token_ids, ev.block_size, self.seed, ev.lora_name, parent
                )
                assert keys == ev.block_hashes
                self.index.add_blocks(self.pod, keys, ev.block_hashes, Tier.from_medium(ev.medium))
            elif isinstance(ev, BlockRemoved):
                self.index.remove_engine_hashes(self.pod, ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.index.clear_pod(self.pod)

    def view(self) -> dict[int, str]:
        out = {}
        for key in list(self.index._pods[self.pod].keys) if self.pod in self.index._pods else []:
            for pod, tier in self.index.holders(key):
                if pod == self.pod:
                    out[key] = "GPU" if tier == Tier.GPU else "CPU"
        return out


def make_engine(replayer: Replayer | None = None, lm: LatencyModel = LM, **cfg: object) -> Engine:
    return Engine("e0", EngineConfig(**cfg), lm, on_events=replayer)  # type: ignore[arg-type]


def toks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n, dtype=np.uint32)


def run(
    engine: Engine, now: float = 0.0, until_step: float | None = None, check=None
) -> tuple[float, list[FinishedRequest], list[StepOutcome]]:
    """Drive the engine until idle; returns (end time, finished, outcomes)."""
    finished: list[FinishedRequest] = []
    outs: list[StepOutcome] = []
    for _ in range(1_000_000):
        at = engine.next_step_at(now)
        if at is None:
            break
        now = at
        out = engine.step(now, None if until_step is None else now + until_step)
        outs.append(out)
        finished += out.finished
        now += out.duration_s
        if check is not None:
            check(engine)
    return now, finished, outs


def check_accounting(engine: Engine) -> None:
    """Every block's ref count equals the holders; the free queue holds exactly the free."""
    cache = engine.cache
    holders: dict[int, int] = {}
    seq_blocks = [s.blocks for s in engine._seqs.values()] + list(engine._pinned.values())
    for blocks in seq_blocks:
        for b in blocks:
            holders[b] = holders.get(b, 0) + 1
    free_ids = set(cache.free_queue())
    assert len(free_ids) == cache.num_free
    for b in range(cache.num_gpu_blocks):
        assert cache.ref[b] >= 0
        assert cache.ref[b] == holders.get(b, 0), b
        assert (cache.ref[b] == 0) == (b in free_ids)
    assert cache.num_free + cache.num_used == cache.num_gpu_blocks
    for key, b in cache._cached.items():
        assert cache.key[b] == key
    running = len(engine._running)
    assert running <= engine.config.max_num_seqs
    assert engine._n_dec + len(engine._prefilling) == running


# ------------------------------------------------------------------- basics
def test_single_request_runs_prefill_then_decode_and_reports_timing() -> None:
    eng = make_engine(num_gpu_blocks=64)
    eng.add_request(SimRequest("a", toks(100, 1), 10, arrival=0.0), 0.0)
    end, fin, outs = run(eng)
    assert [f.request_id for f in fin] == ["a"]
    f = fin[0]
    assert f.output_tokens == 10 and f.prompt_tokens == 100
    assert outs[0].first_tokens == ["a"]
    assert f.first_token_at == pytest.approx(outs[0].duration_s)
    assert f.finished_at == pytest.approx(end)
    assert len(outs) == 10  # one prefill step + 9 decode steps
    assert f.ttft > 0 and f.tpot > 0
    m = eng.metrics()
    assert (m.running, m.waiting, m.used_blocks) == (0, 0, 0)
    assert m.generation_tokens == 10 and m.prompt_tokens == 100
    assert m.cached_blocks == (100 + 9) // BS  # full blocks of prompt + computed output


def test_cached_prefix_is_reused_by_a_later_request() -> None:
    eng = make_engine(num_gpu_blocks=256)
    shared = toks(160, 1)
    eng.add_request(SimRequest("a", np.concatenate([shared, toks(40, 2)]), 5), 0.0)
    now, _, _ = run(eng)
    eng.add_request(SimRequest("b", np.concatenate([shared, toks(40, 3)]), 5), now)
    _, fin, _ = run(eng, now)
    assert fin[0].cached_tokens == 160
    m = eng.metrics()
    assert m.prefix_cache_hits == 160 and m.prefix_cache_queries == 400


def test_full_hit_still_recomputes_the_last_token() -> None:
    eng = make_engine(num_gpu_blocks=256)
    prompt = toks(64, 1)
    eng.add_request(SimRequest("a", prompt, 2), 0.0)
    now, _, _ = run(eng)
    eng.add_request(SimRequest("b", prompt, 2), now)
    _, fin, outs = run(eng, now)
    assert fin[0].cached_tokens == 48  # the last full block is recomputed for its logits
    assert outs[0].num_tokens == 16


def test_precomputed_block_keys_must_match_the_prompt_length() -> None:
    eng = make_engine(num_gpu_blocks=64)
    with pytest.raises(ValueError, match="block keys"):
        eng.add_request(SimRequest("a", toks(64, 1), 2, block_keys=[1, 2]), 0.0)


def test_bad_requests_are_rejected_with_a_clear_error() -> None:
    eng = make_engine(num_gpu_blocks=4)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request(SimRequest("a", [], 2), 0.0)
    with pytest.raises(ValueError, match="max_output_tokens"):
        eng.add_request(SimRequest("a", [1, 2], 0), 0.0)
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        eng.add_request(SimRequest("a", toks(70, 1), 10), 0.0)
    eng.add_request(SimRequest("a", [1, 2], 1), 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request(SimRequest("a", [1, 2], 1), 0.0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=300, max_num_batched_tokens=256)


# ----------------------------------------------------------------- eviction
def test_freed_blocks_are_evicted_least_recently_used_first() -> None:
    rep = Replayer()
    eng = make_engine(rep, num_gpu_blocks=12)
    a, b = toks(64, 1), toks(64, 2)
    eng.add_request(SimRequest("a", a, 1), 0.0)
    now, _, _ = run(eng)
    eng.add_request(SimRequest("b", b, 1), now)
    now, _, _ = run(eng, now)
    keys_a = token_block_keys(a, BS)
    keys_b = token_block_keys(b, BS)
    assert set(eng.cached_keys()) == set(keys_a + keys_b)
    # 12 blocks: 4 never used are handed out first, then A's (older), tail block first.
    eng.add_request(SimRequest("c", toks(112, 3), 1), now)
    run(eng, now)
    removed = [h for ev in rep.events if isinstance(ev, BlockRemoved) for h in ev.block_hashes]
    assert removed == [keys_a[3], keys_a[2], keys_a[1]]
    assert set(keys_b) <= set(eng.cached_keys())


def test_a_hit_refreshes_blocks_in_the_lru_order() -> None:
    rep = Replayer()
    eng = make_engine(rep, num_gpu_blocks=8)
    a, b = toks(64, 1), toks(64, 2)
    now = 0.0
    for rid, prompt in (("a", a), ("b", b), ("a2", np.concatenate([a, toks(1, 9)]))):
        eng.add_request(SimRequest(rid, prompt, 1), now)
        now, _, _ = run(eng, now)
    eng.add_request(SimRequest("c", toks(32, 3), 1), now)
    run(eng, now)
    removed = [h for ev in rep.events if isinstance(ev, BlockRemoved) for h in ev.block_hashes]
    keys_b = token_block_keys(b, BS)
    assert set(removed) <= set(keys_b)  # a was used more recently than b


# --------------------------------------------------------------- preemption
def test_preemption_under_memory_pressure_still_finishes_every_request() -> None:
    eng = make_engine(num_gpu_blocks=40)
    for i in range(12):
        eng.add_request(SimRequest(f"r{i}", toks(100, i), 120), 0.0)
    _, fin, _ = run(eng, check=check_accounting)
    assert sorted(f.request_id for f in fin) == sorted(f"r{i}" for i in range(12))
    assert all(f.output_tokens == 120 for f in fin)
    assert eng.metrics().preemptions > 0
    assert sum(f.preemptions for f in fin) == eng.metrics().preemptions
    assert eng.cache.num_used == 0


def test_preempted_request_recomputes_from_its_cached_blocks() -> None:
    eng = make_engine(num_gpu_blocks=24)
    for i in range(4):
        eng.add_request(SimRequest(f"r{i}", toks(96, i), 100), 0.0)
    _, fin, outs = run(eng, check=check_accounting)
    assert len(fin) == 4 and eng.metrics().preemptions > 0
    # Recompute is chunked into the token budget like any prefill.
    assert max(o.num_tokens for o in outs) <= 8192


# ------------------------------------------------------------ chunked prefill
def test_chunked_prefill_respects_the_token_budget() -> None:
    eng = make_engine(num_gpu_blocks=128, max_num_batched_tokens=64, max_num_seqs=4)
    eng.add_request(SimRequest("a", toks(200, 1), 3), 0.0)
    eng.add_request(SimRequest("b", toks(50, 2), 3), 0.0)
    _, fin, outs = run(eng, check=check_accounting)
    assert all(o.num_tokens <= 64 for o in outs)
    # a: 64+64+64+8; b's whole 50-token prompt fits in the 56 left in step 4.
    assert [o.num_tokens for o in outs[:4]] == [64, 64, 64, 58]
    assert outs[2].first_tokens == [] and outs[3].first_tokens == ["a", "b"]
    assert len(fin) == 2


def test_decode_tokens_are_scheduled_before_prefill_chunks() -> None:
    eng = make_engine(num_gpu_blocks=128, max_num_batched_tokens=32, max_num_seqs=4)
    eng.add_request(SimRequest("a", toks(20, 1), 5), 0.0)
    out = eng.step(0.0)
    now = out.duration_s
    eng.add_request(SimRequest("b", toks(100, 2), 5), now)
    out = eng.step(now)
    assert out.num_tokens == 32  # a's decode token + 31 tokens of b's prompt
    assert eng._seqs["b"].computed == 31


def test_max_num_seqs_caps_the_running_set() -> None:
    eng = make_engine(num_gpu_blocks=256, max_num_seqs=2)
    for i in range(5):
        eng.add_request(SimRequest(f"r{i}", toks(20, i), 4), 0.0)
    eng.step(0.0)
    m = eng.metrics()
    assert (m.running, m.waiting) == (2, 3)


# ------------------------------------------------------------------ chunked prefill cost
def test_a_decode_step_sharing_its_batch_with_a_prefill_chunk_pays_the_mixed_batch_cost() -> None:
    eng = make_engine(num_gpu_blocks=256)
    eng.add_request(SimRequest("d", toks(100, 1), 50), 0.0)
    now = eng.step(0.0).duration_s  # d's prefill; d decodes from here on
    decode_only = eng.step(now)
    now += decode_only.duration_s
    assert decode_only.num_tokens == 1
    eng.add_request(SimRequest("p", toks(300, 2), 5), now)
    shared = eng.step(now)
    assert shared.num_tokens == 301  # d's decode token + p's whole prompt
    # The shared step costs its roofline (d's token next to p's chunk) plus the mixed-batch
    # penalty, which a decode-only step of the same shape does not pay.
    roofline = LM.step_time(301, 2, 300 * 150.5, 300 + 102)
    assert shared.duration_s == pytest.approx(roofline + LM.mixed_batch_time())
    assert LM.mixed_batch_time() == pytest.approx(
        LM.profile.model.layers * LM.profile.efficiency.mixed_batch_layer_latency_s
    )
    assert shared.duration_s > decode_only.duration_s + LM.mixed_batch_time()


# ------------------------------------------------------------------ CPU tier
def test_evicted_blocks_move_to_cpu_and_reload_on_a_hit() -> None:
    rep = Replayer()
    eng = make_engine(rep, num_gpu_blocks=8, num_cpu_blocks=16)
    a = toks(96, 1)
    keys_a = token_block_keys(a, BS)
    eng.add_request(SimRequest("a", a, 1), 0.0)
    now, _, _ = run(eng)
    eng.add_request(SimRequest("b", toks(96, 2), 1), now)
    now, _, _ = run(eng, now)
    # b took the 2 never-used blocks, then a's blocks tail first: a[5..2] went to CPU.
    cached = eng.cached_keys()
    assert [cached[k] for k in keys_a] == ["GPU"] * 2 + ["CPU"] * 4
    eng.add_request(SimRequest("a2", np.concatenate([a, toks(10, 3)]), 1), now)
    _, fin, outs = run(eng, now)
    assert fin[0].cached_tokens == 96
    assert all(eng.cached_keys()[k] == "GPU" for k in keys_a)
    # The reload costs PCIe time: more than a plain GPU hit of the same shape.
    gpu_only = LM.prefill_time(10, 96)
    assert outs[0].duration_s == pytest.approx(gpu_only + LM.transfer_time_cpu(4), rel=0.05)
    assert rep.view() == eng.cached_keys()


# -------------------------------------------------------------------- events
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    blocks=st.integers(12, 60),
    cpu=st.sampled_from([0, 8, 32]),
    budget=st.sampled_from([48, 256, 8192]),
    fuse=st.booleans(),
)
def test_replaying_events_reproduces_the_engine_cache(
    seed: int, blocks: int, cpu: int, budget: int, fuse: bool
) -> None:
    rep = Replayer()
    eng = make_engine(
        rep,
        num_gpu_blocks=blocks,
        num_cpu_blocks=cpu,
        max_num_batched_tokens=budget,
        max_num_seqs=8,
    )
    rng = np.random.default_rng(seed)
    prefixes = [toks(int(rng.integers(16, 120)), seed * 10 + i) for i in range(3)]
    now = 0.0
    for i in range(12):
        p = prefixes[int(rng.integers(0, 3))]
        prompt = np.concatenate([p, toks(int(rng.integers(1, 60)), seed * 100 + i)])
        out_len = int(rng.integers(1, 40))
        if -(-(len(prompt) + out_len) // BS) > blocks:
            continue
        lora = "lora-x" if rng.random() < 0.2 else None
        eng.add_request(SimRequest(f"r{i}", prompt, out_len, lora=lora), now)
        for _ in range(int(rng.integers(0, 6))):
            at = eng.next_step_at(now)
            if at is None:
                break
            until = at + float(rng.uniform(0.0, 0.3)) if fuse else None
            now = at + eng.step(at, until).duration_s
            check_accounting(eng)
            assert rep.view() == eng.cached_keys()
    run(eng, now, until_step=0.2 if fuse else None, check=check_accounting)
    assert rep.view() == eng.cached_keys()
    assert eng.cache.num_used == 0


def test_events_are_published_at_the_end_of_the_step() -> None:
    rep = Replayer()
    eng = make_engine(rep, num_gpu_blocks=64)
    eng.add_request(SimRequest("a", toks(64, 1), 1), 0.0)
    out = eng.step(0.0)
    assert rep.times == [pytest.approx(out.duration_s)]
    first = rep.events[0]
    assert isinstance(first, BlockStored)
    assert first.parent_block_hash is None and len(first.block_hashes) == 4
    assert len(first.token_ids) == 64 and first.medium == "GPU"


def test_reset_prefix_cache_clears_and_emits_all_blocks_cleared() -> None:
    rep = Replayer()
    eng = make_engine(rep, num_gpu_blocks=64)
    eng.add_request(SimRequest("a", toks(64, 1), 3), 0.0)
    eng.step(0.0)
    assert not eng.reset_prefix_cache(1.0)  # blocks in use
    now, _, _ = run(eng, 1.0)
    assert eng.reset_prefix_cache(now)
    assert isinstance(rep.events[-1], AllBlocksCleared)
    assert eng.cached_keys() == {} and rep.view() == {}


# ----------------------------------------------------------------------- P/D
def test_prefill_role_pins_blocks_until_released() -> None:
    eng = make_engine(num_gpu_blocks=64, role=Role.PREFILL)
    eng.add_request(SimRequest("a", toks(100, 1), 50), 0.0)
    _, fin, outs = run(eng)
    assert len(outs) == 1 and fin[0].kv_pinned and fin[0].output_tokens == 1
    assert eng.cache.num_used == 7 and len(eng.pinned_blocks("a")) == 7
    eng.release("a")
    assert eng.pinned_blocks("a") == []
    assert eng.cache.num_used == 0
    with pytest.raises(KeyError):
        eng.release("a")


def test_decode_pod_pulls_only_the_blocks_it_does_not_hold() -> None:
    rep = Replayer("d")
    dec = Engine("d", EngineConfig(num_gpu_blocks=128, role=Role.DECODE), LM, rep)
    shared = toks(64, 1)
    dec.add_request(SimRequest("warm", np.concatenate([shared, toks(8, 2)]), 1), 0.0)
    now, _, _ = run(dec)
    link = KVLink(latency_s=0.002, bandwidth_Bps=25e9)
    prompt = np.concatenate([shared, toks(100, 3)])  # 164 tokens: 11 blocks, 4 cached
    dec.add_request(SimRequest("a", prompt, 4, kv_link=link, kv_source="p0"), now)
    _, fin, outs = run(dec, now, check=check_accounting)
    per_block = LM.profile.kv_bytes_per_block
    assert link.bytes_moved == pytest.approx(7 * per_block)
    assert link.transfers == 1
    f = fin[0]
    assert f.cached_tokens == 64 and f.transferred_tokens == 100 and f.output_tokens == 4
    assert [o.kv_pulled for o in outs if o.kv_pulled] == [["a"]]
    # The transfer delays the first token by latency + bytes / bandwidth.
    assert f.first_token_at - now >= link.transfer_time(7 * per_block)
    # Admission only starts the pull; the first step after it computes the last prompt token.
    assert (outs[0].steps, outs[0].duration_s) == (0, 0.0)
    assert next(o.num_tokens for o in outs if o.steps) == 1
    keys = token_block_keys(prompt, BS)
    assert set(keys) <= set(dec.cached_keys())
    assert rep.view() == dec.cached_keys()


def test_transfers_on_one_link_are_serialised() -> None:
    link = KVLink(latency_s=0.001, bandwidth_Bps=1e9)
    t1 = link.reserve(0.0, 1e6)
    t2 = link.reserve(0.0, 1e6)
    assert t1 == pytest.approx(0.002) and t2 == pytest.approx(0.003)
    assert link.transfer_time(0) == 0.0


def test_pd_prefill_then_decode_round_trip() -> None:
    pre = Engine("p", EngineConfig(num_gpu_blocks=64, role=Role.PREFILL), LM)
    dec = Engine("d", EngineConfig(num_gpu_blocks=64, role=Role.DECODE), LM)
    prompt = toks(150, 5)
    pre.add_request(SimRequest("a", prompt, 20), 0.0)
    now, _pfin, _ = run(pre)
    link = KVLink()
    dec.add_request(SimRequest("a", prompt, 20, kv_link=link, kv_source="p"), now)
    released: list[str] = []
    t = now
    finished: list[FinishedRequest] = []
    while dec.has_work():
        at = dec.next_step_at(t)
        assert at is not None
        out = dec.step(at)
        for rid in out.kv_pulled:
            pre.release(rid)
            released.append(rid)
        finished += out.finished
        t = at + out.duration_s
    assert released == ["a"] and pre.cache.num_used == 0
    assert finished[0].output_tokens == 20
    assert link.bytes_moved == pytest.approx(10 * LM.profile.kv_bytes_per_block)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(30, 80))
def test_decode_pod_under_memory_pressure_finishes_pulled_and_local_requests(
    seed: int, blocks: int
) -> None:
    rep = Replayer("d")
    dec = Engine(
        "d",
        EngineConfig(num_gpu_blocks=blocks, role=Role.DECODE, max_num_seqs=6),
        LM,
        rep,
    )
    rng = np.random.default_rng(seed)
    shared = toks(48, seed)
    link = KVLink(latency_s=0.001, bandwidth_Bps=5e9)
    want = set()
    done: set[str] = set()
    now = 0.0
    for i in range(10):
        prompt = np.concatenate([shared, toks(int(rng.integers(1, 200)), seed + i)])
        out_len = int(rng.integers(1, 120))
        if -(-(len(prompt) + out_len) // BS) > blocks:
            continue
        pulled = bool(rng.random() < 0.6)
        req = SimRequest(f"r{i}", prompt, out_len, kv_link=link if pulled else None)
        dec.add_request(req, now)
        want.add(f"r{i}")
        for _ in range(int(rng.integers(0, 4))):
            at = dec.next_step_at(now)
            if at is None:
                break
            out = dec.step(at)
            done |= {f.request_id for f in out.finished}
            now = at + out.duration_s
            check_accounting(dec)
    _, fin, _ = run(dec, now, check=check_accounting)
    done |= {f.request_id for f in fin}
    assert done == want
    assert dec.cache.num_used == 0 and not dec.has_work()
    assert rep.view() == dec.cached_keys()


# -------------------------------------------------------------------- fusion
def _workload(eng: Engine, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shared = toks(256, seed)
    for i in range(n):
        prompt = np.concatenate([shared, toks(int(rng.integers(10, 300)), seed + i)])
        eng.add_request(SimRequest(f"r{i}", prompt, int(rng.integers(1, 200))), 0.0)


def _timings(fin: Iterable[FinishedRequest]) -> list[tuple[str, float, float, int]]:
    return sorted((f.request_id, f.first_token_at, f.finished_at, f.output_tokens) for f in fin)


@pytest.mark.parametrize("blocks", [200, 60])
def test_fused_decode_steps_give_the_same_results_as_single_steps(blocks: int) -> None:
    rep_a, rep_b = Replayer(), Replayer()
    a = make_engine(rep_a, num_gpu_blocks=blocks)
    b = make_engine(rep_b, num_gpu_blocks=blocks)
    _workload(a, 30, 1)
    _workload(b, 30, 1)
    end_a, fin_a, outs_a = run(a)
    end_b, fin_b, outs_b = run(b, until_step=0.5, check=check_accounting)
    assert len(outs_b) < len(outs_a)
    assert sum(o.steps for o in outs_b) == len(outs_a)
    ta, tb = _timings(fin_a), _timings(fin_b)
    assert [t[0] for t in ta] == [t[0] for t in tb]
    for x, y in zip(ta, tb, strict=True):
        assert x[1:] == pytest.approx(y[1:], rel=1e-9)
    assert end_a == pytest.approx(end_b, rel=1e-9)
    assert a.metrics().generation_tokens == b.metrics().generation_tokens
    assert a.metrics().preemptions == b.metrics().preemptions
    # Same events, published at the same (step-end) times.
    assert rep_a.events == rep_b.events
    assert rep_a.times == pytest.approx(rep_b.times, rel=1e-9)
    assert rep_b.view() == b.cached_keys()


def test_kv_utilization_counts_blocks_held_by_requests() -> None:
    eng = make_engine(num_gpu_blocks=100)
    eng.add_request(SimRequest("a", toks(160, 1), 30), 0.0)
    eng.step(0.0)
    assert eng.metrics().kv_utilization == pytest.approx(0.10)
