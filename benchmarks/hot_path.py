"""Hot-path benchmark: hash + index lookup + score + pick.

Method: every figure is the median (and p99) over >= 1,000 timed calls after 100 warm-up
calls, on this machine, single thread. The index holds 1,000,000 (block, pod) entries over 32
pods: 1,000 conversations of 500 blocks (16 tokens each), each held by 2 pods. The request is an
8,000-token prompt sharing its first 400 blocks with one of them. "schedule" is the full
`Scheduler.schedule` call (tokens given), timed in the same run for four profiles: every
scorer of the registry enabled, llm-d's precise weights (the peers' kind, the baseline),
kvroute's default (`predicted-ttft-scorer`), and the default with 1,000 decisions held pending
in the index (300 blocks each, one of them on the query's prefix).
Shadow policies (`shadow_policies:`): the default profile's `schedule` with 0, 1
(llm-d-default) and 3 (round-robin, llm-d-default, sglang-cache-aware) shadows, each the
median over `--rounds` interleaved rounds of the per-round median; per shadow = (with k − with
0) / k, target <= 50 us. The sglang tree holds the 1,000 conversations (picked through the
hooks), so its match walks a full tree; the requests carry their text, as a face's do.
Bytes per entry: tracemalloc's growth while building the index / (block, pod) entries, for
the plain index (approximate mode) and with engine hashes (precise mode, fed by KV events).
The tokenizer is a byte-level BPE trained in-process (vocab 16k) — no downloads.

    python benchmarks/hot_path.py [--json] [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from router.blocks import BlockConfig, BlockKeyer, PrefixTokenizer, token_block_keys
from router.config import parse_config
from router.index import BlockIndex
from router.pods import MetricsSnapshot, Pod, PodRegistry
from router.request import RoutingRequest, parse_request
from router.scheduler import Scheduler
from router.shadow import ShadowStats
from router.sim.policies import policy_config

PODS = 32
CONVERSATIONS = 1_000
BLOCKS_PER_CONV = 500
HOLDERS_PER_CONV = 2
BLOCK = 16

ALL_SCORERS_CONFIG = """
plugins:
  - {type: prefix-cache-scorer, parameters: {mode: precise}}
  - {type: uncached-tokens-load-scorer, parameters: {mode: precise}}
  - {type: kv-cache-utilization-scorer}
  - {type: queue-scorer}
  - {type: active-request-scorer}
  - {type: load-aware-scorer}
  - {type: session-affinity-scorer}
  - {type: lora-affinity-scorer}
  - {type: no-hit-lru-scorer}
  - {type: max-score-picker}
schedulingProfiles:
  - name: default
    plugins:
      - {pluginRef: prefix-cache-scorer, weight: 3}
      - {pluginRef: uncached-tokens-load-scorer, weight: 2}
      - {pluginRef: kv-cache-utilization-scorer, weight: 1}
      - {pluginRef: queue-scorer, weight: 1}
      - {pluginRef: active-request-scorer, weight: 1}
      - {pluginRef: load-aware-scorer, weight: 1}
      - {pluginRef: session-affinity-scorer, weight: 1}
      - {pluginRef: lora-affinity-scorer, weight: 1}
      - {pluginRef: no-hit-lru-scorer, weight: 1}
      - {pluginRef: max-score-picker}
"""

#: Shadow policy sets timed on the default profile (0, 1 and 3 shadows).
SHADOW_SETS: list[tuple[str, ...]] = [
    (),
    ("llm-d-default",),
    ("round-robin", "llm-d-default", "sglang-cache-aware"),
]

#: Decisions held pending (picked, KV events not yet seen) in the "with pending" run.
PENDING_DECISIONS = 1_000
#: (name, simulator policy or None for ALL_SCORERS_CONFIG, with pending decisions). The
#: policies are the simulator's definitions (`router.sim.policies`): llm-d's precise guide
#: weights as the peers' baseline, and kvroute's default profile on the precise index.
SCHEDULE_PROFILES = [
    ("all_scorers", None, False),
    ("llm_d_precise", "llm-d-precise", False),
    ("default", "kvroute-default", False),
    ("default_with_pending", "kvroute-default", True),
]


def timeit(fn: Callable[[], object], calls: int, warmup: int = 100) -> tuple[float, float]:
    """(median ms, p99 ms) of `calls` timed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    gc.disable()
    try:
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def conversation_tokens(rng: np.random.Generator, n_tokens: int) -> np.ndarray:
    return rng.integers(0, 32_000, size=n_tokens, dtype=np.uint32)


def build_index(engine_hashes: bool) -> tuple[BlockIndex, list[np.ndarray], int]:
    """The 1M-entry index; returns it, the conversations' tokens, and bytes it allocated."""
    rng = np.random.default_rng(1)
    convs = [conversation_tokens(rng, BLOCKS_PER_CONV * BLOCK) for _ in range(CONVERSATIONS)]
    keys = [token_block_keys(c, BLOCK) for c in convs]
    pick = random.Random(2)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = BlockIndex()
    for i, ks in enumerate(keys):
        for pod in pick.sample(range(PODS), HOLDERS_PER_CONV):
            hashes = [k ^ (pod + 1) for k in ks] if engine_hashes else None
            index.add_blocks(f"10.0.0.{pod}:8000", ks, engine_hashes=hashes)
        keys[i] = []  # drop our copy so only the index's memory is counted
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return index, convs, used


def train_tokenizer() -> PrefixTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = [
        "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 7))
        for i in range(5_000)
    ]
    rng = random.Random(3)
    corpus = [" ".join(rng.choices(words, k=60)) for _ in range(3_000)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16_000, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PrefixTokenizer(tok, max_entries=1024)


def chat_body(n_words: int, turns: int, seed: int) -> dict:
    rng = random.Random(seed)
    words = [
        "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 7))
        for i in range(5_000)
    ]
    per = max(1, n_words // (2 * turns))
    messages = [{"role": "system", "content": " ".join(rng.choices(words, k=per))}]
    for t in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choices(words, k=per))})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=per))})
    return {"model": "m", "messages": messages}


def time_shadows(
    registry: PodRegistry,
    index: BlockIndex,
    ptok: PrefixTokenizer,
    convs: list[np.ndarray],
    qlist: list[int],
    calls: int,
    rounds: int,
) -> dict[str, float]:
    """`schedule` of the default profile with each of `SHADOW_SETS`, interleaved over
    `rounds`; the median of the per-round medians, and the cost per shadow policy."""
    # The prompts' text, as a face has it (sglang's tree matches text; from token ids alone
    # it would join them into one, ~0.5 ms for 8k tokens, which a live request never pays).
    texts = [" ".join(map(str, conv[: 100 * BLOCK].tolist())) for conv in convs]
    qtext = " ".join(map(str, qlist))
    scheds = []
    for shadows in SHADOW_SETS:
        config = dataclasses.replace(
            policy_config("kvroute-default", block_size=BLOCK, seed=1), shadow_policies=shadows
        )
        sched = Scheduler(
            config,
            registry=registry,
            precise_index=index,
            keyer=BlockKeyer(BlockConfig(mode="tokens", block_size=BLOCK), ptok),
            seed=1,
        )
        # Picks of every conversation through the hooks (long ago: their pending entries
        # have expired by the timed calls), so sglang's tree holds them all.
        for conv, text in zip(convs, texts, strict=True):
            ids = conv[: 100 * BLOCK].tolist()
            d = sched.schedule(RoutingRequest(model="m", prompt=text, token_ids=ids), now=-100.0)
            sched.on_pick(d, now=-100.0)
            sched.on_first_token(d, now=-100.0)
            sched.on_complete(d, None, now=-100.0)
        if sched.shadows is not None:  # count the timed calls only
            for sp in sched.shadows.policies:
                sp.stats = ShadowStats()
        scheds.append(sched)
    medians: list[list[float]] = [[] for _ in SHADOW_SETS]
    for _ in range(rounds):
        for i, sched in enumerate(scheds):

            def schedule(sched: Scheduler = sched) -> None:
                sched.schedule(
                    RoutingRequest(model="m", prompt=qtext, token_ids=qlist, session_key="s1"),
                    now=1.0,
                )

            medians[i].append(timeit(schedule, max(200, calls // rounds), warmup=20)[0])
    out: dict[str, float] = {}
    base = statistics.median(medians[0])
    for shadows, ms in zip(SHADOW_SETS, medians, strict=True):
        k = len(shadows)
        out[f"schedule_default_{k}_shadows_p50_ms"] = statistics.median(ms)
        if k:
            out[f"shadow_cost_{k}_per_policy_us"] = (statistics.median(ms) - base) / k * 1e3
    for sched in scheds:
        if sched.shadows is not None:
            for sp in sched.shadows.policies:
                st = sp.stats
                key = f"shadow_{sp.name.replace('-', '_')}_of_{len(sched.shadows.policies)}"
                out[f"{key}_mean_us"] = st.seconds / st.requests * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--calls", type=int, default=2_000)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the shadow timings")
    args = ap.parse_args()
    calls = max(1_000, args.calls)
    out: dict[str, float] = {}

    # --- tokenize + key an ~8,000-token chat prompt, and key only
    ptok = train_tokenizer()
    keyer = BlockKeyer(BlockConfig(mode="tokens", block_size=BLOCK), ptok)
    body = chat_body(6_000, turns=10, seed=5)
    req0 = parse_request(body, "/v1/chat/completions")
    n_tokens = len(ptok.encode_plain(req0.prompt))
    # scale the body so the prompt is ~8,000 tokens
    body = chat_body(int(6_000 * 8_000 / n_tokens), turns=10, seed=5)
    req0 = parse_request(body, "/v1/chat/completions")
    tokens = ptok.encode_plain(req0.prompt)
    out["prompt_tokens"] = len(tokens)

    def tokenize_and_key_uncached() -> None:
        token_block_keys(ptok.encode_plain(req0.prompt), BLOCK)

    # Next turn of the conversation: the history (all but the last user message and the
    # generation prompt) was tokenized by the previous turn; only the new tail is not.
    history = req0.segments[:-2]
    ptok.encode(history)
    gen_prompt = req0.segments[-1]
    turn = iter(range(10**9))

    def tokenize_and_key_cached_turn() -> None:
        i = next(turn)
        segs = (*history, f"<|user|>\nnew question {i} about item {i * 7919}\n", gen_prompt)
        keyer.keys(RoutingRequest(model="m", prompt="".join(segs), segments=segs))

    tok_calls = max(200, calls // 10)
    out["tokenize_key_8k_median_ms"], out["tokenize_key_8k_p99_ms"] = timeit(
        tokenize_and_key_uncached, tok_calls, warmup=10
    )
    # Multi-turn gain: the next turn's segments extend a cached prefix.
    out["tokenize_key_8k_prefix_cached_median_ms"], _ = timeit(
        tokenize_and_key_cached_turn, tok_calls, warmup=10
    )
    arr = np.asarray(tokens, dtype=np.uint32)
    out["key_8k_median_ms"], out["key_8k_p99_ms"] = timeit(
        lambda: token_block_keys(arr, BLOCK), calls
    )
    lst = list(tokens)
    out["key_8k_from_list_median_ms"], _ = timeit(lambda: token_block_keys(lst, BLOCK), calls)

    # --- index memory (both modes) and longest_prefix on 1M entries
    index_e, _, used_e = build_index(engine_hashes=True)
    out["bytes_per_entry_with_engine_hashes"] = used_e / index_e.entry_count()
    del index_e
    gc.collect()
    index, convs, used = build_index(engine_hashes=False)
    entries = index.entry_count()
    out["index_entries"] = entries
    out["bytes_per_entry"] = used / entries
    query = np.concatenate(
        [convs[17][: 400 * BLOCK], conversation_tokens(np.random.default_rng(9), 100 * BLOCK)]
    )
    qkeys = token_block_keys(query, BLOCK)
    out["longest_prefix_median_ms"], out["longest_prefix_p99_ms"] = timeit(
        lambda: index.longest_prefix(qkeys), calls
    )

    # --- full schedule: 32 pods, tokens given; several profiles in the same run, so the
    # default's cost is read against a baseline measured on the same host at the same time.
    registry = PodRegistry()
    prng = random.Random(4)
    for pod in range(PODS):
        p = Pod(endpoint=f"10.0.0.{pod}:8000", models=frozenset({"m"}))
        p.metrics = MetricsSnapshot(
            waiting=prng.randint(0, 8),
            running=prng.randint(0, 64),
            kv_utilization=prng.random(),
            taken_at=0.0,
        )
        registry.upsert(p)
    qlist = query.tolist()
    pending_keys = [token_block_keys(c[: 300 * BLOCK], BLOCK) for c in convs[:PENDING_DECISIONS]]
    for name, policy, pending in SCHEDULE_PROFILES:
        if policy is None:
            config = dataclasses.replace(parse_config(ALL_SCORERS_CONFIG, "<hot_path>"), seed=1)
        else:
            config = policy_config(policy, block_size=BLOCK, seed=1)
        sched = Scheduler(
            config,
            registry=registry,
            precise_index=index,
            keyer=BlockKeyer(BlockConfig(mode="tokens", block_size=BLOCK), ptok),
            seed=1,
        )
        entries_pending = []
        if pending:
            for i, keys in enumerate(pending_keys):
                entries_pending.append(index.add_pending(f"10.0.0.{i % PODS}:8000", keys, 1e9))

        def schedule(sched: Scheduler = sched) -> None:
            sched.schedule(
                RoutingRequest(model="m", prompt="", token_ids=qlist, session_key="s1"), now=1.0
            )

        out[f"schedule_{name}_p50_ms"], out[f"schedule_{name}_p99_ms"] = timeit(schedule, calls)
        for entry in entries_pending:
            if entry is not None:
                index.release_pending(entry)
    out.update(time_shadows(registry, index, ptok, convs, qlist, calls, max(1, args.rounds)))
    out["schedule_p50_ms"] = out["schedule_all_scorers_p50_ms"]
    out["schedule_p99_ms"] = out["schedule_all_scorers_p99_ms"]

    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in out.items()}))
        return
    print(f"prompt: {out['prompt_tokens']:.0f} tokens; index: {entries:,} (block, pod) entries")
    rows = [
        ("tokenize + key 8k chat prompt", "tokenize_key_8k_median_ms", "tokenize_key_8k_p99_ms"),
        ("  same, next turn (prefix cache)", "tokenize_key_8k_prefix_cached_median_ms", None),
        ("key only (8k tokens, numpy)", "key_8k_median_ms", "key_8k_p99_ms"),
        ("key only (8k tokens, list)", "key_8k_from_list_median_ms", None),
        ("longest_prefix (1M entries)", "longest_prefix_median_ms", "longest_prefix_p99_ms"),
    ]
    for name, _, _ in SCHEDULE_PROFILES:
        label = f"schedule (32 pods, {name.replace('_', ' ')})"
        rows.append((label, f"schedule_{name}_p50_ms", f"schedule_{name}_p99_ms"))
    print(f"{'':36}{'median ms':>12}{'p99 ms':>10}")
    for label, med, p99 in rows:
        p99s = f"{out[p99]:10.3f}" if p99 else f"{'':>10}"
        print(f"{label:36}{out[med]:12.3f}{p99s}")
    for shadows in SHADOW_SETS:
        k = len(shadows)
        label = f"schedule (32 pods, default, {k} shadow{'s' if k != 1 else ''})"
        rows.append((label, f"schedule_default_{k}_shadows_p50_ms", None))
    for label, med, _ in rows[len(rows) - len(SHADOW_SETS) :]:
        print(f"{label:36}{out[med]:12.3f}  (median of {args.rounds} rounds)")
    for shadows in SHADOW_SETS[1:]:
        k = len(shadows)
        print(
            f"per shadow policy ({k}: {', '.join(shadows)}): "
            f"{out[f'shadow_cost_{k}_per_policy_us']:.1f} us (target <= 50 us)"
        )
    gain = out["tokenize_key_8k_median_ms"] / out["tokenize_key_8k_prefix_cached_median_ms"]
    print(f"tokenizer prefix cache: {gain:.1f}x faster on the next turn of a conversation")
    print(
        f"bytes per (block, pod) entry: {out['bytes_per_entry']:.0f} "
        f"(with engine-hash map: {out['bytes_per_entry_with_engine_hashes']:.0f})"
    )


if __name__ == "__main__":
    main()
