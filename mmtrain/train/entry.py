"""The rank entry point: `python -m mmtrain.train --recipe R.yaml --out DIR` (what deepspeed / torchrun / srun
start on every rank) and `mmtrain train`, which takes the same arguments. Heavy imports wait inside `run_train`, so
the preemption handlers installed by `mmtrain/train/__main__.py` cover start-up."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from mmtrain.errors import UserError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML (launch/recipes/*.yaml)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, stages, metrics")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set stages.1.optimizer.lr=3e-5 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    parser.add_argument("--allow-recipe-change", action="store_true",
                        help="with --resume: accept a recipe that differs from the checkpoint's in fields that alter "
                             "training")
    parser.add_argument("--start-stage", help="start at this stage (its starting weights: --init-from or --out)")
    parser.add_argument("--init-from", help="a run directory whose stages/<previous stage> holds the weights")
    parser.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's


def run_train(args: argparse.Namespace) -> int:
    # lazy: start-up runs under the preemption handlers __main__ installed first (see the module docstring)
    from mmtrain.config import load_recipe
    from mmtrain.doctor import preflight
    from mmtrain.train.engine import RankFailure, Trainer
    from mmtrain.train.heartbeat import HANG_EXIT_CODE, REPORT
    from mmtrain.train.run_context import RunOptions

    recipe = load_recipe(args.recipe, args.set)
    options = RunOptions(out=Path(args.out), resume=args.resume, allow_recipe_change=args.allow_recipe_change,
                         start_stage=args.start_stage,
                         init_from=Path(args.init_from) if args.init_from else None,
                         stop_after_steps=args.stop_after_steps, preflight=preflight)
    trainer = Trainer(recipe, options)
    try:
        results = trainer.run()
    except RankFailure as exc:
        # The hang report is written. Leave at once: tearing down a process group whose peer is dead can block.
        print(f"mmtrain train: rank {trainer.rank} failed: {exc}; see {options.out / REPORT}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(HANG_EXIT_CODE)
    if trainer.rank == 0:
        for r in results:
            if r.losses:
                print(f"stage {r.name}: {len(r.losses)} steps this run, loss {r.losses[0]:.4f} → {r.losses[-1]:.4f}, "
                      f"trainable {r.trainable}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mmtrain.train ...`: the same as `mmtrain train ...`, one line on a user error."""
    parser = argparse.ArgumentParser(prog="python -m mmtrain.train")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UserError as exc:
        print(f"mmtrain train: error: {exc}", file=sys.stderr)
        return 2
