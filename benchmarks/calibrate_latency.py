"""Calibration of the step-time model against measured H100 kernels.

Method: the measured file (default `benchmarks/data/h100-bf16.json`, a copy of the team's
/work/shared/data/gpu-profile/h100-bf16.json; medians of 20 CUDA-event timings on one H100
80GB HBM3, bf16) is compared figure by figure with `router.sim.latency.LatencyModel` under the
bundled profiles (`router.sim.calibration.compare`): GEMMs by token count, lm_head, prefill and
decode attention, whole-model prefill (transformers eager: logits for every position, no vLLM
step overhead) and decode steps assembled from the measured parts. Prints model vs measured and
the relative error per figure, then the median absolute error per group and overall. Masked
prefill attention with a cached prefix is an upper bound, reported but left out of the overall
median.

    python benchmarks/calibrate_latency.py [--data FILE] [--json] [--group SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from router.sim.calibration import compare, summarize

DEFAULT_DATA = Path(__file__).with_name("data") / "h100-bf16.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--group", default="", help="only groups containing this text")
    args = ap.parse_args(argv)
    try:
        measured = json.loads(args.data.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"cannot read {args.data}: {exc}", file=sys.stderr)
        return 2
    rows = [r for r in compare(measured) if args.group in r.group]
    order = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in rows))}
    rows.sort(key=lambda r: order[r.group])  # stable: figures stay in file order
    groups = summarize(rows)
    scored = [abs(r.error) for r in rows if not r.upper_bound]
    overall = statistics.median(scored) if scored else float("nan")
    if args.json:
        print(
            json.dumps(
                {
                    "rows": [
                        {
                            "group": r.group,
                            "name": r.name,
                            "measured_ms": round(r.measured_ms, 5),
                            "model_ms": round(r.model_ms, 5),
                            "error": round(r.error, 4),
                            "upper_bound": r.upper_bound,
                        }
                        for r in rows
                    ],
                    "groups": {
                        g: {k: round(v, 4) for k, v in s.items()} for g, s in groups.items()
                    },
                    "median_abs_error": round(overall, 4),
                },
                indent=1,
            )
        )
        return 0
    group = None
    for r in rows:
        if r.group != group:
            group = r.group
            print(f"\n{group}")
            print(f"  {'figure':<18}{'measured ms':>12}{'model ms':>12}{'error':>9}")
        print(f"  {r.name:<18}{r.measured_ms:>12.4f}{r.model_ms:>12.4f}{r.error:>+9.1%}")
    print("\nmedian |error| by group")
    for g, s in groups.items():
        print(
            f"  {g:<52} {s['median_abs_error']:>6.1%}  (max {s['max_abs_error']:.1%}, n={s['n']})"
        )
    print(f"\noverall median |error| (excluding upper bounds): {overall:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
