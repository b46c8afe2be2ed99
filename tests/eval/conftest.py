"""Session fixtures for the eval tests: tiny shards from the sample, a tokenizer, untrained tiny model dirs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from eval_helpers import build_model_dir, build_tiny_shards, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    shards = build_tiny_shards(root)
    tok = build_tokenizer(shards, root / "tok")
    return {"root": root, "shards": shards, "tokenizer": tok, "model": build_model_dir(tok, root / "model")}


@pytest.fixture(scope="session")
def layerwise_model(tiny) -> Path:
    return build_model_dir(tiny["tokenizer"], tiny["root"] / "model-layerwise", connector="layerwise", seed=3)


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    """Tiny models run faster on one intra-op thread, and are immune to other processes' load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
