"""Old recipe key names, still read for now: each is moved to its one current name with a `DeprecatedName` warning
naming both dotted paths, and then behaves exactly as the new name.

Why these: a stage's `loader` used to be an untyped mapping of extra LoaderConfig fields, laid over what the trainer
filled in; it is a typed `LoaderSpec` now, and the knobs that have a home elsewhere are read there — the bad-sample
policy and the pixel limit under `faults` (recipe-wide), batch, length and packing on the stage itself.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

from mmtrain.config.recipe import FaultSpec
from mmtrain.config.typed import FieldError, choices_text, field_defaults


class DeprecatedName(FutureWarning):
    """A recipe key under an old name: it still works, as its new name (FutureWarning: shown by default)."""


@dataclass(frozen=True)
class Renamed:
    """A stage key `old` that now lives at `new`: under the same stage, or from the recipe's root (`recipe_wide`)."""

    old: str
    new: str
    recipe_wide: bool = False
    values: tuple[tuple[Any, Any], ...] = ()
    """Old value → new value, where the values changed too (empty: the same values)."""


RENAMED = (
    Renamed("loader.on_error", "faults.on_bad_sample", recipe_wide=True, values=(("warn", "skip"), ("raise", "raise"))),
    Renamed("loader.max_image_pixels", "faults.max_image_pixels", recipe_wide=True),
    Renamed("loader.batch_size", "micro_batch"),
    Renamed("loader.max_length", "max_length"),
    Renamed("loader.pack", "pack"),
)

RETIRED = {"log_every": "every step is logged to metrics.jsonl"}
"""Stage keys that no longer do anything: read, warned about, dropped."""


def _has(node: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _get(node: dict[str, Any], keys: list[str]) -> Any:
    for key in keys:
        node = node[key]
    return node


def _pop(node: dict[str, Any], keys: list[str]) -> Any:
    for key in keys[:-1]:
        node = node[key]
    return node.pop(keys[-1])


def _new_path(rename: Renamed, stage: int) -> str:
    return rename.new if rename.recipe_wide else f"stages.{stage}.{rename.new}"


def warn_renamed(raw_stages: list[Any], where: str) -> None:
    """One DeprecatedName warning per old key, at the stage that states it (before stages inherit)."""
    for i, stage in enumerate(raw_stages):
        for rename in RENAMED:
            keys = rename.old.split(".")
            if _has(stage, keys):
                value = _get(stage, keys)
                mapped = dict(rename.values).get(value, value)
                note = f" ({keys[-1]}: {value} is {rename.new.split('.')[-1]}: {mapped})" if mapped != value else ""
                warnings.warn(f"{where}: stages.{i}.{rename.old} is deprecated, use {_new_path(rename, i)}{note}",
                              DeprecatedName, stacklevel=3)
        for key, why in RETIRED.items():
            if isinstance(stage, dict) and key in stage:
                warnings.warn(f"{where}: stages.{i}.{key} is ignored ({why}); remove it", DeprecatedName,
                              stacklevel=3)


def move_renamed(top: dict[str, Any], stages: list[dict[str, Any]], origins: bool = False) -> None:
    """Old keys of the resolved stages moved to their new names, in place. A recipe-wide name takes the value every
    stage had (the old key where a stage has it, else the recipe's own value); stages that disagree are an error.
    With `origins` the trees hold where each value came from (`mmtrain config show`): moved, never compared."""
    for stage in stages:
        for key in RETIRED:
            stage.pop(key, None)
    for rename in RENAMED:
        keys = rename.old.split(".")
        found = {i: _converted(rename, i, _pop(stage, keys), origins) for i, stage in enumerate(stages)
                 if _has(stage, keys)}
        if not found:
            continue
        if not rename.recipe_wide:
            for i, value in found.items():
                stages[i][rename.new] = value
            continue
        section, key = rename.new.split(".")
        if not isinstance(top.setdefault(section, {}), dict):
            if not origins:
                raise FieldError((section,), f"expected a mapping, got {top[section]!r}")
            top[section] = {}
        if not origins:
            _agree(rename, stages, found, top[section].get(key, field_defaults(FaultSpec)[key]))
        top[section][key] = next(iter(found.values()))


def with_current_names(recipe: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe mapping (a checkpoint's recipe.yaml) with its old names moved to the current ones, silently;
    unchanged where they cannot be (stages that disagree, or not a recipe)."""
    out = copy.deepcopy(recipe)
    stages = out.get("stages")
    if not isinstance(stages, list) or not all(isinstance(s, dict) and "name" in s for s in stages):
        return out
    try:
        move_renamed(out, stages)
    except FieldError:
        return copy.deepcopy(recipe)
    return out


def _converted(rename: Renamed, stage: int, value: Any, origins: bool) -> Any:
    if origins or not rename.values:
        return value
    mapping = dict(rename.values)
    if value not in mapping:
        raise FieldError(("stages", str(stage), *rename.old.split(".")),
                         f"must be {choices_text(tuple(mapping))}, not {value!r}", sep=" ")
    return mapping[value]


def _agree(rename: Renamed, stages: list[dict[str, Any]], found: dict[int, Any], recipe_value: Any) -> None:
    """Every stage's value of a recipe-wide name (the old key's, or the recipe's) must be the same."""
    values = [found.get(i, recipe_value) for i in range(len(stages))]
    for i, value in enumerate(values):
        if value != values[0]:
            first, other = (i, 0) if i in found else (0, i)
            raise FieldError(("stages", str(first), *rename.old.split(".")),
                             f"(deprecated) makes {rename.new} {values[first]!r} in stage {stages[first]['name']!r} "
                             f"but {values[other]!r} in stage {stages[other]['name']!r}; {rename.new} is "
                             "recipe-wide: set it there once", sep=" ")
