"""Which engine-model constants the P/D answer of `kvroute plan` depends on: a tornado table.

Method: one workload (default: the llm-d/AWS P/D setup — GPT-OSS-120B on B200, random
1,024-token prompts with 1,024-token answers, a closed loop at concurrency 128, 256 requests)
runs through the simulator with kvroute's default policy on an aggregated fleet (default
`1:tp4`) and a prefill/decode fleet (default `4p:tp1,1d:tp4`), the same arrivals for both.
The P/D gain is tokens/s(P/D) / tokens/s(aggregated) − 1 (the published figure for this setup
is +70%). Then every constant of `router.sim.plan.SENSITIVITY_CONSTANTS` (the profile's
efficiency factors and latencies, the NVLink bandwidth, the P/D KV link's latency and
bandwidth, `kv_link_latency_s` and `kv_link_bandwidth`) is scaled by 1 − step and 1 + step
(default ±50%; fractions of peak capped at 1) with the others at the profile's values, and
the gain is measured again. Rows are sorted by swing. The simulator runs in virtual time:
figures do not depend on the machine's load, and the same seed gives the same table.

    python benchmarks/plan_sensitivity.py [--profile NAME] [--aggregated SPEC]
        [--disaggregated SPEC] [--prompt-tokens N] [--output-tokens N] [--concurrency N]
        [--output-sigma S] [--requests N] [--step 0.5] [--seed 0] [--json]

With equal answer lengths a closed loop runs in lockstep waves (all slots refill at once), so
prefill chunks meet the decodes of the aggregated node rarely; `--output-sigma 0.5` spreads
the answers and shows the steady-state mix.
"""

from __future__ import annotations

import argparse
import json
import sys

from router.sim.latency import load_profile
from router.sim.plan import PlanError, sensitivity
from router.sim.report import round_figure
from router.sim.runner import SimSettings
from router.sim.workloads import LengthDistribution, make_workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="gpt-oss-120b-b200")
    ap.add_argument("--aggregated", default="1:tp4")
    ap.add_argument("--disaggregated", default="4p:tp1,1d:tp4")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=1024)
    ap.add_argument(
        "--output-sigma",
        type=float,
        default=0.0,
        help="lognormal sigma of the answer lengths (0 = all equal, as in the published run)",
    )
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--step", type=float, default=0.5, help="relative change (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    try:
        if min(args.prompt_tokens, args.output_tokens, args.concurrency, args.requests) < 1:
            raise PlanError("--prompt-tokens, --output-tokens, --concurrency, --requests: ≥ 1")
        profile = load_profile(args.profile)
        workload = make_workload(
            "random",
            seed=args.seed,
            concurrency=args.concurrency,
            num_requests=args.requests,
            prompt=LengthDistribution(args.prompt_tokens),
            output=LengthDistribution(
                args.output_tokens, args.output_sigma, 1, 8 * args.output_tokens
            ),
        )
        runs = [0]

        def tick(spec: str) -> None:
            runs[0] += 1
            print(f"\r  run {runs[0]} ({spec})   ", end="", file=sys.stderr, flush=True)

        show = sys.stderr.isatty()

        base, rows = sensitivity(
            args.aggregated,
            args.disaggregated,
            workload,
            profile,
            SimSettings(seed=args.seed),
            step=args.step,
            progress=tick if show else None,
        )
        if show:
            print(file=sys.stderr)
    except ValueError as exc:  # PlanError, bad profile or fleet spec
        print(f"plan_sensitivity: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        doc = {
            "workload": workload.description,
            "profile": profile.name,
            "aggregated": args.aggregated,
            "disaggregated": args.disaggregated,
            "step": args.step,
            "base": {k: round_figure(v) for k, v in base.items()},
            "rows": [r.to_json() for r in rows],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"P/D gain of {args.disaggregated} over {args.aggregated}, {workload.description}")
    print(
        f"  base: {base['aggregated_tokens_per_s']:,.0f} vs "
        f"{base['disaggregated_tokens_per_s']:,.0f} tok/s → gain {base['gain']:+.1%} "
        f"(per GPU {base['gain_per_gpu']:+.1%}; published: +70%)"
    )
    pct = f"{args.step:.0%}"
    print(f"  {'constant':<30}{'value':>11}{'-' + pct:>10}{'+' + pct:>10}{'swing':>9}")
    for r in rows:
        print(
            f"  {r.constant:<30}{r.base_value:>11.4g}{r.gain_low:>+10.1%}{r.gain_high:>+10.1%}"
            f"{r.swing:>9.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
