"""CPU cost of tokenizing the compare workloads' prompts: `tokenizers` vs the piece cache.

    python benchmarks/tokenize_cost.py [--requests 300] [--trace FILE] [--trace-max-input 40000]

Method: the first `--requests` Mooncake requests (prompts over `--trace-max-input` trace tokens
left out, as compare.py does) rendered as the load generator renders them
(`router.loadgen.tokens_to_text`), then tokenized with the bundled tokenizer three ways, CPU
seconds of this process each: `tokenizers.Tokenizer.encode` (what kvroute's token mode and the
emulator's pods used per prompt), `router.bytelevel.PieceCacheEncoder` from a cold cache, and
the load generator's own text rendering. Prints the ids' agreement too. Pin it (`taskset -c 1`)
to read one core's cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare import default_trace

from router.blocks import BUNDLED_TOKENIZER
from router.bytelevel import PieceCacheEncoder
from router.loadgen import tokens_to_text
from router.sim.traces import trace_workload


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--trace", default=None)
    p.add_argument("--trace-max-input", type=int, default=40_000)
    args = p.parse_args()
    path = args.trace or default_trace()
    if path is None:
        p.error("no Mooncake trace found; give --trace FILE")
    arrivals = trace_workload(str(path), limit=args.requests, seed=0).arrivals
    arrivals = [a for a in arrivals if len(a.token_ids) <= args.trace_max_input]
    t = time.process_time()
    texts = [tokens_to_text(a.token_ids) for a in arrivals]
    render_s = time.process_time() - t
    tok = Tokenizer.from_file(BUNDLED_TOKENIZER)
    enc = PieceCacheEncoder.build(tok)
    assert enc is not None
    t = time.process_time()
    slow = [tok.encode(x, add_special_tokens=False).ids for x in texts]
    slow_s = time.process_time() - t
    t = time.process_time()
    fast = [enc.encode(x) for x in texts]
    fast_s = time.process_time() - t
    tokens = sum(map(len, slow))
    print(
        f"{len(texts)} prompts, {tokens:,} tokens (longest {max(map(len, slow)):,}): "
        f"tokenizers {slow_s:.2f} CPU s ({slow_s / len(texts) * 1e3:.0f} ms a prompt), "
        f"piece cache {fast_s:.2f} CPU s ({fast_s / len(texts) * 1e3:.0f} ms, cold start "
        f"included), same ids: {slow == fast}; load generator rendering {render_s:.2f} CPU s "
        f"({render_s / len(texts) * 1e3:.1f} ms a prompt)"
    )
    return 0 if slow == fast else 1


if __name__ == "__main__":
    sys.exit(main())
