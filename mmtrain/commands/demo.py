"""`mmtrain demo`: the embedded default job (see mmtrain/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtrain.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="sample catalog → shards → two ZeRO-3 stages on 2 ranks → export")
    demo.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    demo.add_argument("--ranks", type=int, default=2, help="local ranks (CPU processes, or GPUs)")
    demo.add_argument("--catalog", help="another catalog CSV in the fashion-products layout (default: the sample)")
    demo.add_argument("--steps-scale", type=float, default=None,
                      help="scale every stage's steps (default 1; a run's figures are from the full steps)")
    demo.add_argument("--quick", action="store_true",
                      help="the same path at a tenth of the steps, scored on the first 360 samples of each "
                           "held-out split: ~2 minutes (CI runs it; its scores are not the README's)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmtrain.demo import QUICK_EVAL_SAMPLES, QUICK_STEPS_SCALE, print_report, run_demo

    if args.quick and args.steps_scale is not None:
        raise UserError("--quick sets the steps (a tenth); give --steps-scale or --quick, not both")
    scale = QUICK_STEPS_SCALE if args.quick else (1.0 if args.steps_scale is None else args.steps_scale)
    report = run_demo(Path(args.out), args.ranks, Path(args.catalog) if args.catalog else None, scale, args.set,
                      QUICK_EVAL_SAMPLES if args.quick else None)
    print_report(report)
    return 0
