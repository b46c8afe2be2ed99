"""`mmtrain doctor`: pre-flight checks of a recipe, printed as a PASS / WARN / FAIL table (exit 2 on any FAIL)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check a recipe, its data, tokenizer, model paths and DeepSpeed "
                                                  "setup before training")
    parser.add_argument("--recipe", required=True, help="recipe YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe field, as for `mmtrain train` (repeatable)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks the run will use (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (for the disk check; default: cwd)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="device the run trains on (default: cuda when a GPU is visible here)")
    parser.add_argument("--build-ops", action="store_true", help="JIT-build the DeepSpeed ops the configs need")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmtrain.config import load_recipe
    from mmtrain.doctor import Check, failures, format_table, run_checks
    from mmtrain.errors import UserError

    if args.world_size < 1:
        raise UserError(f"--world-size must be ≥ 1, got {args.world_size}")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except UserError as exc:
        checks = [Check("recipe", "FAIL", str(exc))]
    else:
        checks = [Check("recipe", "PASS", f"{args.recipe}: {len(recipe.stages)} stage(s) "
                                          f"({', '.join(s.name for s in recipe.stages)})")]
        checks += run_checks(recipe, args.world_size, args.out, args.device, args.build_ops)
    print(format_table(checks))
    return 2 if failures(checks) else 0
