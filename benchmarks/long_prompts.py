"""What the proxy adds to long chat prompts (220 KB and 2 MB bodies), streaming and not.

Method: one zero-latency pod (benchmarks/zero_latency_pod.py; it answers at once, so only what
sits in front of it is measured) and `kvroute proxy` in token mode with the bundled tokenizer
and the default cache-aware profile, each in its own process. From this process, one request
at a time (aiohttp): `--count` distinct chat bodies of each size (pseudo-words from a 20,000-
word vocabulary, a unique number first so no body hits the tokenizer's prefix cache) straight
to the pod ("direct") and through the proxy, each read to its last byte; added = proxy p50 −
direct p50, per size and stream flag. Two proxy configs, one after the other:
- `unbounded`: `blocks.max_keyed_tokens: null` and no character-mode fallback — the whole
  prompt is tokenized, as before the bounds existed;
- `bounded`: the defaults (at most 131,072 tokens keyed, character mode over 1 MiB of prompt);
- `tokens-only` (`--config tokens-only`): the token bound without the character-mode fallback.
The proxy's CPU seconds per request are reported too (load-independent on a shared machine).
Median of `--runs` runs of each figure.

    python benchmarks/long_prompts.py [--runs 3] [--count 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from http_load import Child, cpu_seconds, python
from proxy_overhead import _free_port, _Proxy, _wait_ready

from router.blocks import BUNDLED_TOKENIZER

SIZES = {"220kb": 220_000, "2mb": 2_000_000}
CONFIGS = {
    "unbounded": "  max_keyed_tokens: null\n  tokenize_max_chars: 100000000\n",
    "bounded": "",
    "tokens-only": "  tokenize_max_chars: 100000000\n",
}


def _vocab(seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(20_000)]


def make_bodies(size: int, count: int, stream: bool, seed: int) -> list[bytes]:
    """`count` distinct chat bodies of about `size` bytes."""
    rng = random.Random(seed)
    vocab = _vocab()
    out = []
    for i in range(count):
        text = f"{seed}-{i} " + " ".join(rng.choices(vocab, k=size // 6))
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": text[: size - 120]}],
            "max_tokens": 4,
            "stream": stream,
        }
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return out


async def timed_posts(url: str, bodies: list[bytes]) -> list[float]:
    """Seconds per request, one at a time, each read to its last byte."""
    headers = {"content-type": "application/json"}
    lat = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"{url}: HTTP {r.status}")
            lat.append(time.perf_counter() - t0)
    return lat


def measure(config_extra: str, pod: str, runs: int, count: int) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(
            f"pods:\n  - {{endpoint: '{pod}', models: [m]}}\n"
            f"blocks:\n  mode: tokens\n  tokenizer_path: {BUNDLED_TOKENIZER}\n{config_extra}"
        )
        port = _free_port()
        proxy = _Proxy(config, port)
        try:
            _wait_ready(f"http://127.0.0.1:{port}")
            direct = f"http://{pod}/v1/chat/completions"
            proxied = f"http://127.0.0.1:{port}/v1/chat/completions"
            # Warm-up: the encoder's piece cache learns the vocabulary, as in a live proxy.
            asyncio.run(timed_posts(proxied, make_bodies(220_000, 3, False, seed=1)))
            for run in range(runs):
                for name, size in SIZES.items():
                    for stream in (False, True):
                        key = f"{name}_{'stream' if stream else 'whole'}"
                        seed = 100 + run * 10 + stream
                        d = asyncio.run(timed_posts(direct, make_bodies(size, count, stream, seed)))
                        bodies = make_bodies(size, count, stream, seed + 1000)
                        cpu0 = cpu_seconds(proxy.proc.pid)
                        p = asyncio.run(timed_posts(proxied, bodies))
                        cpu = (cpu_seconds(proxy.proc.pid) - cpu0) / count
                        added = statistics.median(p) - statistics.median(d)
                        out.setdefault(f"added_p50_ms_{key}", []).append(added * 1e3)
                        out.setdefault(f"proxy_p50_ms_{key}", []).append(statistics.median(p) * 1e3)
                        out.setdefault(f"proxy_cpu_ms_per_request_{key}", []).append(cpu * 1e3)
        finally:
            proxy.stop()
    return {k: round(statistics.median(v), 2) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=5, help="requests per size, stream flag, run")
    parser.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = ["unbounded", "bounded"] if args.config == "both" else [args.config]
    pod = Child(
        python(str(Path(__file__).resolve().parent / "zero_latency_pod.py"), "--ports", "0")
    )
    try:
        endpoint = f"127.0.0.1:{pod.ready[0]}"
        result: dict[str, object] = {
            name: measure(CONFIGS[name], endpoint, args.runs, args.count) for name in names
        }
    finally:
        pod.stop()
    result["runs"] = args.runs
    result["count"] = args.count
    if args.json:
        print(json.dumps(result))
        return 0
    for name in names:
        print(f"{name}:")
        for k, v in result[name].items():  # type: ignore[union-attr]
            print(f"  {k:40s} {v:>10.2f}")
    print(f"(median of {args.runs} runs of {args.count} requests each, one at a time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
