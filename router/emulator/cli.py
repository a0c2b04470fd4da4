"""`kvroute emulate pod ...` and `kvroute emulate fleet ...`: argument parsing and entry points.

`router/cli.py` lists this module in SUBCOMMANDS; `add_parser` registers `emulate`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from router.blocks import BUNDLED_TOKENIZER
from router.emulator.settings import EmulatorSettings, FaultSettings

_DEFAULTS = EmulatorSettings()
_FAULT_DEFAULTS = FaultSettings()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "emulate",
        help="run vLLM-compatible emulated pods (one pod, or a fleet of processes)",
        description="Fake vLLM pods with real wire formats and the simulator's engine timing.",
    )
    sub = p.add_subparsers(dest="emulate_command", metavar="{pod,fleet}")
    pod = sub.add_parser("pod", help="serve one emulated vLLM pod")
    add_pod_arguments(pod)
    pod.set_defaults(func=_run_pod)
    fleet = sub.add_parser("fleet", help="start N emulated pods as processes and write a config")
    _add_fleet_arguments(fleet)
    fleet.set_defaults(func=_run_fleet)
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])
    return p


def add_pod_arguments(p: argparse.ArgumentParser, *, fleet: bool = False) -> None:
    """Pod options (a fleet passes the shared ones through to every pod)."""
    d = _DEFAULTS
    if not fleet:
        p.add_argument("--host", default=d.host, help="address to bind (default %(default)s)")
        p.add_argument("--port", type=int, default=d.port, help="API port (0 = free port)")
        p.add_argument("--role", choices=("both", "prefill", "decode"), default=d.role)
        p.add_argument(
            "--side-channel-port",
            type=int,
            default=d.side_channel_port,
            help="KV side-channel port (0 = free port)",
        )
        p.add_argument(
            "--admin-port",
            type=int,
            default=None,
            help="serve GET|POST /admin/faults on this port only (0 = free port); without it "
            "the pod has no admin endpoint. Never the API port",
        )
        ev = p.add_mutually_exclusive_group()
        ev.add_argument(
            "--events-connect",
            metavar="ADDR",
            help="publish KV events by connecting to a router's SUB socket",
        )
        ev.add_argument(
            "--events-bind",
            metavar="ADDR",
            help="publish KV events on a bound PUB socket, e.g. tcp://127.0.0.1:5557",
        )
        p.add_argument(
            "--events-replay",
            metavar="ADDR",
            help="replay ROUTER socket to bind (default tcp://HOST:0)",
        )
        p.add_argument(
            "--events-topic",
            default=d.events_topic,
            help="topic of every batch (default empty, as vLLM's); {endpoint} and {model} are "
            "filled in, e.g. 'kv@{endpoint}@{model}' (llm-d's convention)",
        )
        p.add_argument(
            "--events-connect-wait-s",
            type=float,
            default=d.events_connect_wait_s,
            help="with --events-connect: hold batches until the router's SUB has subscribed, "
            "at most this long (default %(default)s s)",
        )
    p.add_argument(
        "--tokenize-process",
        action="store_true",
        help="tokenize long prompts in a child process, off the engine's step loop (as vLLM's "
        "API server does; the live benchmark's setting)",
    )
    p.add_argument("--profile", default=d.profile, help="latency profile (default %(default)s)")
    p.add_argument("--model", help="served model name (default: the profile's model)")
    p.add_argument(
        "--lora",
        dest="lora_adapters",
        action="append",
        default=[],
        metavar="NAME",
        help="serve a LoRA adapter name (repeatable)",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=d.speedup,
        help="emulated seconds per wall second (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--tokenizer",
        default=BUNDLED_TOKENIZER,
        help="tokenizer.json, or 'builtin' for the built-in hash tokenizer "
        "(default: kvroute's bundled tokenizer, which the router can load too)",
    )
    p.add_argument(
        "--chat-template",
        help="tokenizer_config.json holding the chat template (default: the one beside "
        "--tokenizer)",
    )
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage reports prompt_tokens_details.cached_tokens (vLLM's flag; off by default)",
    )
    p.add_argument("--num-gpu-blocks", type=int, help="override the profile's KV block count")
    p.add_argument(
        "--block-size", type=int, help="tokens per KV block (vLLM's flag; default: the profile's)"
    )
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--output-mode", choices=("random", "echo"), default=d.output_mode)
    p.add_argument("--output-length", choices=("max", "random"), default=d.output_length)
    p.add_argument("--events-wire-form", choices=("array", "map"), default=d.events_wire_form)
    p.add_argument("--kv-pin-timeout-s", type=float, default=d.kv_pin_timeout_s)
    p.add_argument("--kv-link-latency-s", type=float, default=d.kv_link_latency_s)
    p.add_argument(
        "--kv-link-bandwidth-gbps",
        type=float,
        default=d.kv_link_bandwidth_gbps,
        help="GB/s per prefill→decode pod pair",
    )
    p.add_argument(
        "--old-metric-names", action="store_true", help="also expose deprecated vLLM metric names"
    )
    p.add_argument("--no-precise-timers", dest="precise_timers", action="store_false")
    f = _FAULT_DEFAULTS
    g = p.add_argument_group("fault injection (also POST /admin/faults with --admin-port)")
    g.add_argument("--fault-error-rate", type=float, default=f.error_rate)
    g.add_argument("--fault-error-status", type=int, default=f.error_status)
    g.add_argument("--fault-latency-spike-rate", type=float, default=f.latency_spike_rate)
    g.add_argument("--fault-latency-spike-s", type=float, default=f.latency_spike_s)
    g.add_argument("--fault-crash-after-tokens", type=int, default=f.crash_after_tokens)
    g.add_argument("--fault-crash-exits-process", action="store_true")
    g.add_argument("--fault-stall-rate", type=float, default=f.stall_rate)
    g.add_argument("--fault-stall-s", type=float, default=f.stall_s)
    g.add_argument("--fault-drop-kv-events-rate", type=float, default=f.drop_kv_events_rate)
    g.add_argument("--fault-unhealthy", action="store_true")
    g.add_argument("--fault-metrics-error", action="store_true")


def settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    faults = FaultSettings(
        **{f.name: getattr(args, f"fault_{f.name}") for f in fields(FaultSettings)}
    )
    values = {
        f.name: getattr(args, f.name)
        for f in fields(EmulatorSettings)
        if f.name != "faults" and hasattr(args, f.name)
    }
    values["lora_adapters"] = tuple(values.get("lora_adapters", ()))
    if values.get("tokenizer") == "builtin":
        values["tokenizer"] = None
    return EmulatorSettings(**values, faults=faults)


def _run_pod(args: argparse.Namespace) -> int:
    from router.emulator.server import run_pod

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"kvroute emulate pod: {exc}", file=sys.stderr)
        return 2
    return run_pod(settings)


def _add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, required=True, help="number of pods")
    p.add_argument("--pd", metavar="P:D", help="split the pods into P prefill and D decode pods")
    p.add_argument("--base-port", type=int, help="API port of pod i = B + i (default: free)")
    ev = p.add_mutually_exclusive_group()
    ev.add_argument(
        "--events-bind", action="store_true", help="each pod binds its own PUB socket (the default)"
    )
    ev.add_argument(
        "--events-connect",
        "--router-events",
        metavar="ADDR",
        help="pods connect their PUB sockets to the router's SUB at ADDR",
    )
    ev.add_argument("--no-events", action="store_true", help="publish no KV events")
    p.add_argument(
        "--admin",
        action="store_true",
        help="give every pod an admin port (/admin/faults) of its own (printed per pod)",
    )
    p.add_argument(
        "--write-config", metavar="FILE", type=Path, help="write a kvroute config listing the pods"
    )
    add_pod_arguments(p, fleet=True)


def _run_fleet(args: argparse.Namespace) -> int:
    from router.emulator.fleet import EmulatedFleet, FleetError, parse_pd, pod_args_from

    try:
        pd = parse_pd(args.pd, args.pods) if args.pd else None
        settings_from_args(args)  # validate the shared pod options once, here
    except ValueError as exc:
        print(f"kvroute emulate fleet: {exc}", file=sys.stderr)
        return 2
    events = "none" if args.no_events else ("connect" if args.events_connect else "bind")
    fleet = EmulatedFleet(
        pods=args.pods,
        pd=pd,
        base_port=args.base_port,
        events=events,
        events_connect=args.events_connect,
        pod_args=pod_args_from(args),
        admin=args.admin,
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with fleet:
                if args.write_config:
                    fleet.write_config(args.write_config)
                for pod in fleet.pods:
                    admin = f"  admin=http://{pod.admin}" if pod.admin else ""
                    print(
                        f"{pod.role:8s} http://{pod.endpoint}  events={pod.kv_events_endpoint}"
                        f"  replay={pod.kv_replay_endpoint}{admin}",
                        flush=True,
                    )
                print("ready", flush=True)
                await stop.wait()
        except FleetError as exc:
            print(f"kvroute emulate fleet: {exc}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(main())
