"""Tiny shards, tokenizer and recipe for the distributed trainer tests (built once per session, from the sample)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtrain.data.build import build_from_catalog
from mmtrain.data.tokenizer import iter_shard_texts, train_tokenizer
from mmtrain.data.writer import BuildOptions

REPO = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, real_catalog: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-data")
    lines = (real_catalog / "styles.csv").read_bytes().splitlines(keepends=True)[:161]
    (root / "styles.csv").write_bytes(b"".join(lines))
    spec = REPO / "shards" / "catalogs" / "fashion-products.yaml"
    paths = {"mm": root / "mm", "text": root / "text", "tokenizer": root / "tok"}
    for kind in ("mm", "text"):
        build_from_catalog(spec, root / "styles.csv", real_catalog,
                           BuildOptions(out=paths[kind], image_size=48, shard_size=200, progress=False),
                           text_only=kind == "text")
    train_tokenizer(list(iter_shard_texts(paths["mm"])) + list(iter_shard_texts(paths["text"])), 400,
                    paths["tokenizer"])
    return paths
