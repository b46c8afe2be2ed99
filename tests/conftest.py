"""Shared fixtures: where the real catalog lives (../shared in CI and dev, the shipped sample otherwise), and tiny
multimodal + text-only shard sets built from its first 160 rows (once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# 2-rank runs start under torchrun (1.9 s) instead of the DeepSpeed launcher (5.5 s): ~35 runs, two minutes of the
# suite. The DeepSpeed launcher keeps its own tests: the two-stage run, preemption and resume name it.
os.environ.setdefault("MMTRAIN_LAUNCHER", "torchrun")

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "shards" / "catalogs" / "fashion-products.yaml"
SAMPLE = REPO / "shards" / "sample"
SHARED_CATALOG = REPO.parent / "shared" / "datasets" / "fashion-products"


@pytest.fixture(scope="session")
def real_catalog() -> Path:
    """The full 4,000-product catalog when ../shared is there, else the 1,500-product sample shipped in the repo."""
    return SHARED_CATALOG if (SHARED_CATALOG / "styles.csv").is_file() else SAMPLE


@pytest.fixture(scope="session")
def fashion_spec() -> Path:
    return SPEC


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, real_catalog: Path) -> dict[str, Path]:
    """`mm` and `text` shard sets from the catalog's first 160 rows (48 px images), shared by the trainer and doctor
    tests, which each train their own tokenizer on them."""
    from mmtrain.data.shards.build import build_from_catalog
    from mmtrain.data.shards.writer import BuildOptions

    root = tmp_path_factory.mktemp("tiny-shards")
    lines = (real_catalog / "styles.csv").read_bytes().splitlines(keepends=True)[:161]
    (root / "styles.csv").write_bytes(b"".join(lines))
    paths = {"mm": root / "mm", "text": root / "text"}
    for kind in ("mm", "text"):
        build_from_catalog(SPEC, root / "styles.csv", real_catalog,
                           BuildOptions(out=paths[kind], image_size=48, shard_size=200, progress=False),
                           text_only=kind == "text")
    return paths

