"""Reading the project's YAML files (recipes, catalog specs) with one clear error per failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmtrain.errors import UserError


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The YAML mapping at `path`; a missing file, bad YAML or a non-mapping raise UserError naming `what` and path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must be a YAML mapping")
    return raw
