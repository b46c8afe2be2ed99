"""`mmtrain demo`: the embedded default job (see mmtrain/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="sample catalog → shards → two ZeRO-3 stages on 2 ranks → export")
    demo.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    demo.add_argument("--ranks", type=int, default=2, help="local ranks (CPU processes, or GPUs)")
    demo.add_argument("--catalog", help="another catalog CSV in the fashion-products layout (default: the sample)")
    demo.add_argument("--steps-scale", type=float, default=1.0, help="scale every stage's steps (quick tries)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmtrain.demo import print_report, run_demo

    report = run_demo(Path(args.out), args.ranks, Path(args.catalog) if args.catalog else None, args.steps_scale,
                      args.set)
    print_report(report)
    return 0
