"""The tiny shards with a 1,000-piece tokenizer (as `mmtrain demo` trains for tiny-cpu.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tiny_data import tiny_tokenizer_for

@pytest.fixture(scope="session")
def doctor_data(tmp_path_factory, tiny_shards: dict[str, Path]) -> dict[str, Path]:
    # 1,000 pieces as `mmtrain demo` trains for tiny-cpu.yaml: with 400 the owl system line alone is ~134 tokens,
    # and 134 + 65 abstractor slots do not fit the recipe's max_length 192 (the doctor rightly fails that).
    return tiny_tokenizer_for(tiny_shards, 1000, tmp_path_factory.mktemp("doctor-tokenizer") / "tok")


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe mapping to a YAML file and return its path."""
    def write(raw: dict[str, Any], name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path
    return write
