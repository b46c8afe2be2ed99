"""Reading a recipe: YAML, `--set` overrides, stage inheritance, old names moved, then the typed tree — any error
names the file and the dotted path at fault."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

from mmtrain.config.raw import apply_override, resolve_stages
from mmtrain.config.recipe import Recipe
from mmtrain.config.renamed import move_renamed, warn_renamed
from mmtrain.config.typed import FieldError, build
from mmtrain.errors import UserError
from mmtrain.yamlfile import read_yaml_mapping


def load_raw(path: str | Path, overrides: Iterable[str] = ()) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """The recipe YAML with the `--set key.path=value` overrides applied, and the paths they set."""
    raw = read_yaml_mapping(path, "recipe")
    return raw, [apply_override(raw, assignment) for assignment in overrides]


def resolve(raw: dict[str, Any], where: str = "recipe", origins: bool = False) -> dict[str, Any]:
    """The raw recipe with every stage deep-merged onto the one before it and old names moved to their new ones (a
    DeprecatedName warning each, unless `origins`: a tree of where values came from, see show.py)."""
    raw = copy.deepcopy(raw)
    stages = raw.get("stages", [])
    if not isinstance(stages, list):
        raise FieldError(("stages",), f"expected a list of stages, got {stages!r}")
    if not origins:
        warn_renamed(stages, where)
    raw["stages"] = resolve_stages(stages)
    move_renamed(raw, raw["stages"], origins)
    return raw


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    """The typed recipe from its YAML mapping; a UserError naming `where` and the dotted path at fault."""
    try:
        return build(Recipe, resolve(raw, where))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """A recipe YAML (+ `--set key.path=value` overrides applied before the stages are resolved)."""
    raw, _ = load_raw(path, overrides)
    return recipe_from_dict(raw, str(path))
