"""Test helper: a tokenizer trained on the tiny shard sets of the `tiny_shards` fixture (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path


def tiny_tokenizer_for(shards: dict[str, Path], vocab_size: int, out: Path) -> dict[str, Path]:
    """The shard paths plus a sentencepiece tokenizer of `vocab_size` pieces trained on their text, saved at `out`."""
    from mmtrain.data.loader.tokenizer import iter_shard_texts, train_tokenizer

    train_tokenizer(list(iter_shard_texts(shards["mm"])) + list(iter_shard_texts(shards["text"])), vocab_size, out)
    return {**shards, "tokenizer": out}
