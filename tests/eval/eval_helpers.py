"""Tiny shards, tokenizer and model directories for the eval tests (CPU, built from the shipped sample)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.loader.image_token import image_token_id
from mmtrain.data.loader.tokenizer import iter_shard_texts, load_tokenizer, train_tokenizer
from mmtrain.data.shards.writer import BuildOptions, build_shards, split_of
from mmtrain.data.shards.records import Sample, WorkItem
from mmtrain.model import VisionLanguageModel
from mmtrain.model.presets import tiny_config

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "shards" / "catalogs" / "fashion-products.yaml"
SAMPLE = REPO / "shards" / "sample"


def build_tiny_shards(root: Path, products: int = 60, val_fraction: float = 0.2) -> Path:
    """~`products` sample products → shards of the five tasks (32 px images), split train / val by product."""
    lines = (SAMPLE / "styles.csv").read_bytes().splitlines(keepends=True)[:products + 1]
    (root / "styles.csv").write_bytes(b"".join(lines))
    out = root / "shards"
    build_from_catalog(SPEC, root / "styles.csv", SAMPLE,
                       BuildOptions(out=out, image_size=32, shard_size=200, progress=False, val_fraction=val_fraction))
    return out


def build_tokenizer(shards: Path, out: Path) -> Path:
    return train_tokenizer(list(iter_shard_texts(shards)), 400, out)


def build_model_dir(tokenizer_dir: Path, out: Path, connector: str = "abstractor", seed: int = 0) -> Path:
    """An untrained tiny model whose vocabulary and token ids are the tokenizer's (as the trainer sets them), saved
    as a model directory with the tokenizer files beside it."""
    tok = load_tokenizer(tokenizer_dir)
    config = tiny_config(connector, image_size=32, patch_size=8, hidden=64, layers=2,
                         vocab_size=int(math.ceil(len(tok) / 64) * 64), image_token_id=image_token_id(tok))
    for name in ("bos", "eos", "pad"):
        config.text_config[f"{name}_token_id"] = int(getattr(tok, f"{name}_token_id"))
    torch.manual_seed(seed)
    model = VisionLanguageModel.from_config(config)
    model.save_pretrained(out)
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    return out


def qa(key: str, task: str, question: str, answer: str) -> Sample:
    return Sample(key, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], task,
                  "catalog", key.split("_")[0], 0)


def _split_id(stem: str, split: str) -> str:
    """A split id that the writer's hash puts in `split` (val_fraction 0.5), found by counting up a suffix."""
    n = 0
    while split_of(f"{stem}-{n}", 0.5) != split:
        n += 1
    return f"{stem}-{n}"


def build_text_shards(out: Path, train: list[Sample], val: list[Sample]) -> Path:
    """A hand-built, text-only shard set: exactly `train` in the train split and `val` in the val split."""
    items = [WorkItem(_split_id(s.key, split), (), (s,), i, "hand")
             for split, samples in (("train", train), ("val", val)) for i, s in enumerate(samples)]
    build_shards(items, BuildOptions(out=out, val_fraction=0.5, progress=False), {"source": {"kind": "hand"}})
    return out
