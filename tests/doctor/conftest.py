"""Tiny shards + tokenizer from the real catalog (as tests/train does), and a recipe like tiny-cpu.yaml on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mmtrain.data.build import build_from_catalog
from mmtrain.data.tokenizer import iter_shard_texts, train_tokenizer
from mmtrain.data.writer import BuildOptions

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def doctor_data(tmp_path_factory, real_catalog: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("doctor-data")
    lines = (real_catalog / "styles.csv").read_bytes().splitlines(keepends=True)[:161]
    (root / "styles.csv").write_bytes(b"".join(lines))
    spec = REPO / "shards" / "catalogs" / "fashion-products.yaml"
    paths = {"mm": root / "mm", "text": root / "text", "tokenizer": root / "tok"}
    for kind in ("mm", "text"):
        build_from_catalog(spec, root / "styles.csv", real_catalog,
                           BuildOptions(out=paths[kind], image_size=48, shard_size=200, progress=False),
                           text_only=kind == "text")
    # 1,000 pieces as `mmtrain demo` trains for tiny-cpu.yaml: with 400 the owl system line alone is ~134 tokens,
    # and 134 + 65 abstractor slots do not fit the recipe's max_length 192 (the doctor rightly fails that).
    train_tokenizer(list(iter_shard_texts(paths["mm"])) + list(iter_shard_texts(paths["text"])), 1000,
                    paths["tokenizer"])
    return paths


def tiny_recipe(data: dict[str, Path]) -> dict[str, Any]:
    """launch/recipes/tiny-cpu.yaml with its data paths and tokenizer pointed at the tiny build."""
    raw = yaml.safe_load((REPO / "launch" / "recipes" / "tiny-cpu.yaml").read_text())
    raw["tokenizer"] = str(data["tokenizer"])
    kinds = {"shards/built/sample-mm": "mm", "shards/built/sample-text": "text"}
    for stage in raw["stages"]:
        for source in stage["data"]:
            source["shards"] = str(data[kinds[source["shards"]]])
        if "deepspeed" in stage:
            stage["deepspeed"] = str(REPO / stage["deepspeed"])
    return raw


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe mapping to a YAML file and return its path."""
    def write(raw: dict[str, Any], name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path
    return write
