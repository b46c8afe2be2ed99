"""A recipe like launch/recipes/tiny-cpu.yaml on the tiny test shards (imported by name: conftest modules of
different test folders share the module name `conftest`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_recipe(data: dict[str, Path]) -> dict[str, Any]:
    """launch/recipes/tiny-cpu.yaml with its data paths and tokenizer pointed at the tiny build."""
    raw = yaml.safe_load((REPO / "launch" / "recipes" / "tiny-cpu.yaml").read_text())
    raw["tokenizer"] = str(data["tokenizer"])
    kinds = {"shards/built/sample-mm": "mm", "shards/built/sample-mm-qa": "mm", "shards/built/sample-text": "text",
             "shards/built/sample-text-qa": "text"}
    for stage in raw["stages"]:
        for source in stage["data"]:
            source["shards"] = str(data[kinds[source["shards"]]])
        if "deepspeed" in stage:
            stage["deepspeed"] = str(REPO / stage["deepspeed"])
    return raw
