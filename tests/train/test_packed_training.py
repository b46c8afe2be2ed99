"""A packed stage on 2 gloo ranks: rows filled by token budget, block-diagonal attention, FLOPs counted per sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtrain.launching import run_ranks

from train_helpers import metrics, stage, write_recipe


def test_packed_stage_trains_more_samples_than_rows(tiny_data, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, [
        stage("packed", tiny_data, train={"vision": True, "connector": True, "llm": "full"}, micro_batch=2,
              max_length=512, pack=True, steps=3,
              data=[{"shards": str(tiny_data["mm"]), "weight": 0.6}, {"shards": str(tiny_data["text"]), "weight": 0.4}])])
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(tmp_path / "run")], log=tmp_path / "run.log",
                       timeout=600)
    assert result.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    records = metrics(tmp_path / "run")
    assert [m["step"] for m in records] == [1, 2, 3]
    for m in records:
        assert m["loss"] == m["loss"] and m["tflops"] > 0 and m["mfu"] is None  # CPU: no peak, no MFU
        # 2 rows of 512 tokens on each of 2 ranks hold far more than 4 samples of ~100-250 tokens
        assert m["samples"] > 8, m


def test_varlen_attention_trains_the_dense_masks_losses(tiny_data, tmp_path: Path) -> None:
    """The same packed stage under `attention: sdpa` (dense T×T masks) and `attention: flash_varlen` (on CPU: one
    causal sdpa call per document): equal losses on 2 ranks, step by step, and the stage event names the choice."""
    losses = {}
    for attention in ("sdpa", "flash_varlen"):
        recipe = write_recipe(tmp_path / f"{attention}.yaml", tiny_data, [
            stage("packed", tiny_data, train={"vision": True, "connector": True, "llm": "full"}, micro_batch=2,
                  max_length=512, pack=True, steps=3, data=[{"shards": str(tiny_data["mm"]), "weight": 1.0}])],
            attention=attention)
        run = tmp_path / attention
        result = run_ranks(2, ["--recipe", str(recipe), "--out", str(run)], log=tmp_path / f"{attention}.log",
                           timeout=600)
        assert result.returncode == 0, (tmp_path / f"{attention}.log").read_text()[-3000:]
        losses[attention] = [m["loss"] for m in metrics(run)]
        events = [json.loads(line) for line in (run / "stages.jsonl").read_text().splitlines()]
        assert [(e["attention"], e["compile"]) for e in events] == [(attention, False)]
    assert len(losses["sdpa"]) == 3 and losses["flash_varlen"] == pytest.approx(losses["sdpa"], abs=1e-5)
