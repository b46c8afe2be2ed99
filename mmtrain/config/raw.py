"""The recipe as YAML data, before it is typed: `--set` overrides and stage inheritance."""

from __future__ import annotations

import copy
from typing import Any, Iterable

import yaml

from mmtrain.errors import UserError


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` merged into a copy of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> tuple[str, ...]:
    """`stages.1.optimizer.lr=3e-5` → raw["stages"][1]["optimizer"]["lr"] = 3e-5 (value parsed as YAML). Returns the
    path it set, as strings."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key.path=value")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"--set {assignment!r}: {'.'.join(keys[:i])} has no item {key}")
            key = int(key)
        elif not isinstance(node, dict):
            raise UserError(f"--set {assignment!r}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str):
                try:
                    parsed = float(parsed)  # `3e-5`: YAML 1.1 has no such float, the user meant one
                except ValueError:
                    pass
            node[key] = parsed
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
    return tuple(keys)


def resolve_stages(raw_stages: Iterable[Any]) -> list[dict[str, Any]]:
    """Each stage's mapping deep-merged onto the previous stage's resolved mapping ('state only what differs')."""
    resolved: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or "name" not in raw:
            raise UserError(f"stages.{i}: every stage needs a name, got {raw!r}")
        merged = deep_merge(resolved[-1], raw) if resolved else copy.deepcopy(raw)
        if "data" in raw:
            merged["data"] = copy.deepcopy(raw["data"])  # a new mixture replaces the old one, never merges into it
        resolved.append(merged)
    return resolved


def get_path(tree: Any, path: Iterable[str]) -> Any:
    """The node at a dotted path's keys (list items by index), or KeyError."""
    node = tree
    for key in path:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise KeyError(key)
    return node
