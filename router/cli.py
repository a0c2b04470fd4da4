"""The `kvroute` command: one subcommand per face or tool, each registered by its module."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that add a subcommand with `add_parser(subparsers)`; the parser sets `func`.
SUBCOMMAND_MODULES = ("router.explain",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute", description="Cache-aware router for LLM inference fleets."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
