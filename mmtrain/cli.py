"""The one `mmtrain` command: discovers subcommands in `mmtrain.commands` and runs the chosen one."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence

import mmtrain
import mmtrain.commands
from mmtrain.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtrain", description=mmtrain.__doc__)
    parser.add_argument("--version", action="version", version=f"mmtrain {mmtrain.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(mmtrain.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"mmtrain.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"mmtrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
