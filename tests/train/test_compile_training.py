"""`compile: true` in the trainer: 2 ranks under ZeRO-2 train with the eager run's losses; ZeRO-3 is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtrain.launching import run_ranks

from train_helpers import REPO, metrics, stage, write_recipe


def test_compiled_decoder_blocks_train_with_eager_losses_under_zero2(tiny_data, tmp_path: Path) -> None:
    losses = {}
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_data, [
            stage("s", tiny_data, train={"vision": True, "connector": True, "llm": "full"}, micro_batch=2, steps=3,
                  deepspeed=str(REPO / "ds_configs" / "zero2.json"))], compile=compiled)
        result = run_ranks(2, ["--recipe", str(recipe), "--out", str(tmp_path / name)], log=tmp_path / f"{name}.log",
                           timeout=600)
        assert result.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        losses[name] = [m["loss"] for m in metrics(tmp_path / name)]
        events = [json.loads(line) for line in (tmp_path / name / "stages.jsonl").read_text().splitlines()]
        assert [e["compile"] for e in events] == [compiled]
    assert len(losses["eager"]) == 3 and losses["compiled"] == pytest.approx(losses["eager"], abs=1e-5)
