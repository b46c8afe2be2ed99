"""`mmtrain config show`: every field of a resolved recipe with its value and where the value came from — `default`,
`recipe` (the YAML; `recipe (stage N)` when a stage inherits it from stage N) or `--set`.

Where a value came from is traced with a second tree shaped like the YAML, holding an `Origin` at every leaf, that goes
through the same overrides, stage inheritance and renames as the values do.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from mmtrain.config.load import load_raw, recipe_from_dict, resolve
from mmtrain.config.recipe import Recipe
from mmtrain.config.typed import plain


@dataclass(frozen=True)
class Origin:
    """Where a raw value was written: `recipe` or `--set`, and the stage it was written in (None: recipe-wide)."""

    kind: str
    stage: int | None


@dataclass(frozen=True)
class Row:
    path: str
    value: Any
    source: str


def origin_tree(raw: Any, set_paths: list[tuple[str, ...]], path: tuple[str, ...] = ()) -> Any:
    """`raw` with every leaf replaced by its Origin (mappings and lists of mappings are followed, anything else —
    scalars, lists of scalars, empty containers — is a leaf)."""
    if isinstance(raw, dict) and raw:
        return {k: origin_tree(v, set_paths, path + (str(k),)) for k, v in raw.items()}
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        return [origin_tree(v, set_paths, path + (str(i),)) for i, v in enumerate(raw)]
    kind = "--set" if any(path[:len(p)] == p for p in set_paths) else "recipe"
    stage = int(path[1]) if len(path) > 1 and path[0] == "stages" and path[1].isdigit() else None
    return Origin(kind, stage)


def leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every leaf of the typed tree with its path: specs and non-empty mappings are followed, lists of specs too."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from leaves(getattr(value, f.name), path + (f.name,))
    elif isinstance(value, dict) and value:
        for key, item in value.items():
            yield from leaves(item, path + (str(key),))
    elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
        for i, item in enumerate(value):
            yield from leaves(item, path + (str(i),))
    else:
        yield path, value


def source_of(origins: Any, path: tuple[str, ...]) -> str:
    """`default`, or the Origin found along `path` as `recipe`, `--set`, `recipe (stage N)` (inherited)."""
    node = origins
    for key in path:
        if isinstance(node, Origin):
            break
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return "default"
    if not isinstance(node, Origin):
        return "default"
    here = int(path[1]) if len(path) > 1 and path[0] == "stages" else None
    return node.kind if node.stage is None or node.stage == here else f"{node.kind} (stage {node.stage})"


def recipe_rows(path: str | Path, overrides: Iterable[str] = ()) -> tuple[Recipe, list[Row]]:
    """The typed recipe and one row per field of it."""
    raw, set_paths = load_raw(path, overrides)
    recipe = recipe_from_dict(raw, str(path))
    origins = resolve(origin_tree(raw, set_paths), str(path), origins=True)
    rows = [Row(".".join(p), v, source_of(origins, p)) for p, v in leaves(recipe)]
    return recipe, sorted(rows, key=lambda r: r.path.startswith("stages."))  # recipe-wide first, then each stage


def format_value(value: Any) -> str:
    """A value as YAML would write it inline: null, true, [0.9, 0.98], {llm: 2e-05}, strings bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def render_table(rows: list[Row]) -> str:
    """field, value and source in aligned columns."""
    values = [format_value(r.value) for r in rows]
    path_width = max(len("field"), *(len(r.path) for r in rows))
    value_width = max(len("value"), *(len(v) for v in values))
    lines = [f"{'field':<{path_width}}  {'value':<{value_width}}  source"]
    lines += [f"{r.path:<{path_width}}  {v:<{value_width}}  {r.source}" for r, v in zip(rows, values)]
    return "\n".join(lines)


def render_json(path: str | Path, overrides: Iterable[str], rows: list[Row]) -> str:
    """The rows as JSON: {"recipe", "overrides", "fields": {dotted path: {"value", "source"}}}."""
    return json.dumps({"recipe": str(path), "overrides": list(overrides),
                       "fields": {r.path: {"value": plain(r.value), "source": r.source} for r in rows}}, indent=1)


def show_recipe(path: str | Path, overrides: Iterable[str] = (), as_json: bool = False) -> str:
    """What `mmtrain config show` prints."""
    overrides = list(overrides)
    _, rows = recipe_rows(path, overrides)
    return render_json(path, overrides, rows) if as_json else render_table(rows)
