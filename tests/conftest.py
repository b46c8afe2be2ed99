"""Shared fixtures: where the real catalog lives (../shared in CI and dev, the shipped sample otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
