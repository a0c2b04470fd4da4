"""The `kvroute` command: one subcommand per face or tool, each registered by its module.

Only the module of the subcommand being run is imported (the faces pull in FastAPI, gRPC and
friends), so `kvroute simulate` and `kvroute --help` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand → (module with `add_parser(subparsers)` that sets `func`, one-line help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "router.demo",
        "emulated fleet + proxy + load: cache-aware routing vs round-robin, side by side",
    ),
    "simulate": ("router.sim.cli", "compare routing policies on a simulated vLLM fleet"),
    "plan": (
        "router.sim.plan_cli",
        "which fleet (aggregated or prefill/decode, TP per role) serves a workload best",
    ),
    "explain": (
        "router.explain",
        "route one request against a described fleet and print the per-pod scores",
    ),
    "proxy": (
        "router.proxy.cli",
        "serve an OpenAI-compatible API that routes each request to the best pod",
    ),
    "serve": (
        "envoy_extproc.cli",
        "run the Envoy ext_proc endpoint picker (gRPC), with health and metrics",
    ),
    "sidecar": (
        "router.sidecar",
        "decode-pod sidecar: runs the P/D prefill leg named by x-prefiller-host-port",
    ),
    "emulate": (
        "router.emulator.cli",
        "run vLLM-compatible emulated pods (one pod, or a fleet of processes)",
    ),
    "loadgen": (
        "router.loadgen",
        "replay a workload against an OpenAI-compatible server and time it client-side",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full sub-parser of `command` (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="kvroute", description="Cache-aware router for LLM inference fleets."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in _SERVICE_LOG_LEVEL:
        from router.log_setup import setup_logging

        # One set-up for every long-running command; `proxy` and `serve` redo it with their
        # config's `logging:` section. The tools keep Python's default (warnings only).
        setup_logging(getattr(args, "log_level", None) or _SERVICE_LOG_LEVEL[args.command])
    return int(args.func(args) or 0)


#: Long-running commands → their default log level (an emulated pod logs only its problems).
_SERVICE_LOG_LEVEL = {"proxy": "info", "serve": "info", "sidecar": "info", "emulate": "warning"}


if __name__ == "__main__":
    sys.exit(main())
