"""`kvroute explain`: route one request against a described fleet and show why.

Loads a router config with a static fleet, seeds the default prefix index and each pod's
metrics from a small state file ("pod X holds these prompts, has this load"), schedules one
request without committing it, and prints the per-pod table (prefix hit, each scorer, weights,
total, the pick and, in P/D, the prefill pick). A scorer that explains itself (the default
`predicted-ttft-scorer`) adds its parts: predicted TTFT = queued prefill + own prefill + decode
interference + KV-pressure penalty, in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from router.config import ConfigError, RouterConfig, load_config
from router.index import BlockIndex
from router.pods import MetricsSnapshot
from router.request import RequestError, RoutingRequest, parse_request
from router.scheduler import Decision, Scheduler
from router.shadow import prediction
from router.sim.policies import POLICIES


def _bundled(name: str) -> Path:
    return Path(str(resources.files("router") / "data" / name))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="route one request against a described fleet and print the per-pod scores",
        description="With no arguments, uses the bundled example fleet, state and prompt.",
    )
    p.add_argument("--config", type=Path, default=None, help="router config YAML")
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        help="fleet state YAML: per pod, the prompts it holds and its load (default: bundled)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="completion prompt to route")
    src.add_argument("--body", type=Path, help="OpenAI request body (JSON file) to route")
    p.add_argument("--profile", default=None, help="scheduling profile to run")
    p.add_argument(
        "--shadow",
        action="append",
        default=None,
        metavar="POLICY",
        help="also show where this policy (a `simulate --policies` name) would send the "
        "request; repeatable, added to the config's shadow_policies",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def seed_state(sched: Scheduler, state: dict[str, Any], model: str) -> None:
    """Put each pod's held prompts into the default prefix index, its scraped load into
    metrics and, when given, the router's own in-flight accounting (`inflight_requests`,
    `inflight_prefill_tokens`, `inflight_prefilling`: requests and uncached tokens this router
    sent and not yet prefilled, and how many of those requests have no first token yet)."""
    index = sched.prefix_index()
    for endpoint, info in (state.get("pods") or {}).items():
        if endpoint not in sched.registry:
            raise ConfigError(f"state names pod {endpoint!r}, which the config does not list")
        info = info or {}
        for prompt in info.get("holds") or []:
            req = RoutingRequest(model=model, prompt=prompt, segments=(prompt,))
            index.add_blocks(endpoint, sched.keyer.keys(req))
        sched.registry.set_metrics(
            endpoint,
            MetricsSnapshot(
                waiting=int(info.get("waiting", 0)),
                running=int(info.get("running", 0)),
                kv_utilization=float(info.get("kv_utilization", 0.0)),
                taken_at=0.0,
            ),
        )
        pod = sched.registry[endpoint]
        pod.inflight_requests = int(info.get("inflight_requests", 0))
        pod.inflight_prefill_tokens = int(info.get("inflight_prefill_tokens", 0))
        pod.inflight_prefilling = int(info.get("inflight_prefilling", 0))


def _weights(config: RouterConfig, profile: str) -> dict[str, float]:
    for ps in config.profiles:
        if ps.name == profile:
            return {r.ref: r.weight for r in ps.plugins}
    return {}


#: Columns shown for a scorer's details: (key, header, format).
_DETAIL_COLUMNS = (
    ("predicted_ttft_s", "pred TTFT s", "{:.3f}"),
    ("queued_prefill_s", "queued prefill s", "{:.3f}"),
    ("own_prefill_s", "own prefill s", "{:.3f}"),
    ("decode_interference_s", "decode s", "{:.3f}"),
    ("kv_pressure_s", "kv penalty s", "{:.3f}"),
)


def render_table(decision: Decision, config: RouterConfig) -> str:
    data = decision.explain()
    weights = _weights(config, decision.profile)
    names = list(data["pods"][0]["scores"]) if data["pods"] else []
    detailed = [n for n in names if n in (data["pods"][0].get("details") or {})]
    columns = [
        (n, key, head, fmt)
        for n in detailed
        for key, head, fmt in _DETAIL_COLUMNS
        if key in data["pods"][0]["details"][n]
    ]
    header = [
        "pod",
        "prefix hit",
        *[f"{n} (x{weights.get(n, 1):g})" for n in names],
        *[head for _, _, head, _ in columns],
        "total",
    ]
    rows = []
    for pod in sorted(data["pods"], key=lambda p: -p["total"]):
        mark = " <- pick" if pod["endpoint"] == decision.target else ""
        if pod["endpoint"] in decision.fallbacks:
            mark = " (fallback)"
        rows.append(
            [
                pod["endpoint"],
                f"{pod['prefix_hit']:.0%}",
                *[f"{pod['scores'][n]:.3f}" for n in names],
                *[fmt.format(pod["details"][n][key]) for n, key, _, fmt in columns],
                f"{pod['total']:.3f}{mark}",
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines.append(
        f"profile {decision.profile}: pick {decision.target}; prompt {decision.prompt_tokens} "
        f"tokens, {decision.uncached_tokens} uncached on the prefilling pod"
    )
    if decision.prefill:
        lines.append(f"prefill pick: {decision.prefill} (P/D: remote prefill)")
    if decision.shadows:
        lines += ["", *render_shadows(decision)]
    return "\n".join(lines)


def render_shadows(decision: Decision) -> list[str]:
    """The shadow policies' picks on the same fleet state, beside the live pick."""
    header = ["shadow policy", "pick", "captured tokens", "agrees", "pred TTFT s"]
    live_ttft = prediction(decision, decision.prefill or decision.target)
    rows = [
        [
            f"(live: {decision.profile})",
            decision.prefill or decision.target,
            str(decision.captured_tokens),
            "",
            "" if live_ttft is None else f"{live_ttft:.3f}",
        ]
    ]
    for sp in decision.shadows:
        rows.append(
            [
                sp.policy,
                sp.target if sp.target is not None else f"refused ({sp.error})",
                str(sp.captured_tokens),
                "yes" if sp.agrees else "no",
                "" if sp.predicted_ttft_s is None else f"{sp.predicted_ttft_s:.3f}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(
        f"of {decision.prompt_tokens} prompt tokens; shadows score the same state and send nothing"
    )
    return lines


def _with_shadows(config: RouterConfig, names: list[str] | None) -> RouterConfig:
    """`config` with the `--shadow` policies added to its `shadow_policies`."""
    if not names:
        return config
    known = set(POLICIES)
    for name in names:
        if name not in known:
            raise ConfigError(f"--shadow: unknown policy {name!r} (known: {', '.join(POLICIES)})")
    merged = tuple(dict.fromkeys((*config.shadow_policies, *names)))
    return dataclasses.replace(config, shadow_policies=merged)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config or _bundled("explain-config.yaml"))
        state_path = args.state or (None if args.config else _bundled("explain-state.yaml"))
        state = yaml.safe_load(state_path.read_text()) if state_path else {}
        state = state or {}
        model = state.get("model") or next(
            (m for p in config.pods for m in sorted(p.models)), "default"
        )
        if args.body:
            raw = args.body.read_bytes()
            kind = "/v1/chat/completions" if b'"messages"' in raw else "/v1/completions"
            req = parse_request(raw, kind, settings=config.request)
        else:
            prompt = args.prompt if args.prompt is not None else state.get("prompt")
            if prompt is None:
                print("kvroute explain: give --prompt or --body", file=sys.stderr)
                return 2
            req = parse_request(
                {"model": model, "prompt": prompt}, "/v1/completions", settings=config.request
            )
        config = _with_shadows(config, args.shadow)
        # An explicitly precise config reads the seeded state as a KV-event feed would fill it
        # (shadow policies too).
        precise = (
            BlockIndex(tier_weights=config.prefix_index.tier_weights)
            if config.prefix_index.mode == "precise"
            else None
        )
        sched = Scheduler(config, precise_index=precise)
        seed_state(sched, state, model)
        decision = sched.schedule(req, profile=args.profile, now=0.0)
    except (ConfigError, OSError, yaml.YAMLError) as e:
        print(f"kvroute explain: {e}", file=sys.stderr)
        return 2
    except RequestError as e:
        print(f"kvroute explain: request refused ({e.status}): {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(decision.explain(), indent=2))
    else:
        print(render_table(decision, config))
    return 0
