"""`python -m router.emulator pod|fleet ...`: the `kvroute emulate` command without the rest of
the `kvroute` CLI (the fleet starts its pod processes this way)."""

from __future__ import annotations

import argparse
import sys

from router.emulator.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    root = argparse.ArgumentParser(prog="python -m router.emulator")
    sub = root.add_subparsers(dest="command")
    add_parser(sub)
    args = root.parse_args(["emulate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
