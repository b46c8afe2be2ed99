"""`mmtrain config show RECIPE [--set …] [--json]`: argument parsing only; the work is in mmtrain.config.show."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="show a recipe as the trainer will read it")
    sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="every field of the resolved recipe: value and source (default, recipe, "
                                       "recipe (stage N) when inherited, --set)")
    show.add_argument("recipe", help="recipe YAML")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="override a recipe field, as for `mmtrain train` (repeatable)")
    show.add_argument("--json", action="store_true", help="JSON: {fields: {dotted path: {value, source}}}")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from mmtrain.config.show import show_recipe

    print(show_recipe(args.recipe, args.overrides, as_json=args.json))
    return 0
