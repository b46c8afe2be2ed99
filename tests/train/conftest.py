"""Tiny shards, tokenizer and recipe for the distributed trainer tests (built once per session, from the sample)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_data import tiny_tokenizer_for


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_shards: dict[str, Path]) -> dict[str, Path]:
    return tiny_tokenizer_for(tiny_shards, 400, tmp_path_factory.mktemp("train-tokenizer") / "tok")
