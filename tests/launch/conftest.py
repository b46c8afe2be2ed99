"""Fixtures for the launch tests: tiny shards + tokenizer, and a real one-node SLURM (session-scoped, always stops)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.loader.tokenizer import iter_shard_texts, train_tokenizer
from mmtrain.data.shards.writer import BuildOptions

from slurm_helpers import SlurmCluster, try_install

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))  # train_helpers: TINY_MODEL, recipe builders


@pytest.fixture(scope="session")
def launch_data(tmp_path_factory, real_catalog: Path) -> dict[str, Path]:
    """48 products → 230 train samples in 6 shards of ≤ 40 (48-px images), and a 400-piece tokenizer (~1 s)."""
    root = tmp_path_factory.mktemp("launch-data")
    lines = (real_catalog / "styles.csv").read_bytes().splitlines(keepends=True)[:49]
    (root / "styles.csv").write_bytes(b"".join(lines))
    paths = {"mm": root / "mm", "tokenizer": root / "tok", "catalog": root / "styles.csv", "images": real_catalog}
    build_from_catalog(REPO / "shards" / "catalogs" / "fashion-products.yaml", root / "styles.csv", real_catalog,
                       BuildOptions(out=paths["mm"], image_size=48, shard_size=40, progress=False))
    train_tokenizer(list(iter_shard_texts(paths["mm"])), 400, paths["tokenizer"])
    return paths


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd on this host in a fresh state directory; stopped by pid file at the end."""
    why = try_install()
    if why is not None:
        pytest.skip(f"no SLURM here ({why}); install with: apt-get install -y slurm-wlm munge")
    state = Path(tempfile.mkdtemp(prefix="mmtrain-slurm-"))
    cluster = SlurmCluster(state)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)
