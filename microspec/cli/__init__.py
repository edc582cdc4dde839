"""The `microspec` command line: `microspec <command> --help` for each command.

Each command is a module in this package with `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the handler. Commands import their heavy dependencies lazily, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "generate", "coverage", "fit-frequency", "fit-clusters", "tune", "eval", "train-drafter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microspec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").register(sub)
    return parser


def _version() -> str:
    from microspec import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # bad input or a missing extra: a clear message
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"microspec {args.command}: error: {err}", file=sys.stderr)
        return 2
