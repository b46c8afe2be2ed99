"""`mmtrain demo --quick`: the README's main job, end to end from the console script, at a tenth of the steps.

CI runs it here so a broken demo cannot land. The scores of a tenth of the steps are not the README's; what must hold
is the path: the three-way split, training that lowers the loss, an exported model, and a report of test figures.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mmtrain.config import load_recipe
from mmtrain.demo import HEADLINE, QUICK_EVAL_SAMPLES, QUICK_STEPS_SCALE, RECIPE
from mmtrain.run_report import ATTRIBUTE_CHART


def test_quick_demo_trains_exports_and_reports_test_figures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MMTRAIN_LAUNCHER"}  # the demo's own launcher (DeepSpeed)
    out = tmp_path / "demo"
    result = subprocess.run([shutil.which("mmtrain") or "mmtrain", "demo", "--quick", "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    stages = {s["stage"]: s for s in report["stages"]}
    recipe = load_recipe(RECIPE)
    assert list(stages) == [s.name for s in recipe.stages]
    for stage in recipe.stages:
        assert stages[stage.name]["steps"] == max(2, int(stage.steps * QUICK_STEPS_SCALE))
    first, *_, last = report["stages"]
    assert first["last_loss"] < 0.5 * first["first_loss"]  # the lm stage: 30 steps take the loss from ~6 to ~2
    assert stages["pretrain"]["last_loss"] < stages["pretrain"]["first_loss"]
    assert last["last_loss"] < first["first_loss"]
    assert report["train_parts"]["instruct"] == {"vision": 0, "connector": 0, "llm": 65536}  # LoRA only

    quality = report["quality"]
    sizes = quality["split_products"]
    assert set(sizes) == {"train", "val", "test"} and sum(sizes.values()) == 1500
    assert quality["eval_limit"] == QUICK_EVAL_SAMPLES
    assert 250 < sizes["val"] < 330 and 250 < sizes["test"] < 330  # 20 % each, by a hash of the product id
    assert list(quality["headline"]) == [label for *_, label in HEADLINE] == list(quality["validation"])
    for label, row in quality["headline"].items():
        assert set(row) == {"model", "blank_images", "majority", "n", "se"}, label
        assert 0.0 <= row["model"] <= 1.0 and 0.0 <= row["majority"] <= 1.0, label
        assert 0 < row["n"] <= sizes["test"], label
        assert row["se"] == pytest.approx(math.sqrt(row["model"] * (1 - row["model"]) / row["n"])), label
    metrics = json.loads(Path(quality["metrics"]).read_text())
    assert set(metrics) >= {"model", "blank_images", "majority", "validation"}
    assert quality["attributes"] == metrics["model"]["attributes"]  # per attribute P / R / F1, micro and macro
    assert set(quality["attributes"]["micro"]) == set(quality["attributes"]["macro"]) == {"precision", "recall", "f1"}
    assert quality["caption"] == {k: metrics["model"]["caption"][k] for k in ("n", "bleu", "rouge_l")}
    assert quality["caption"]["n"] > 0 and 0 <= quality["caption"]["bleu"] <= 1  # sacrebleu's, divided by 100
    per_attribute = metrics["model"]["attributes"]["per_attribute"]
    assert set(per_attribute["colour"]) == {"precision", "recall", "f1", "support"}
    assert per_attribute["colour"]["support"] == quality["headline"]["colour (attribute extraction F1)"]["n"]
    assert (Path(report["model"]) / "config.json").is_file()
    pictures = sorted(Path(p).name for p in report["pictures"])
    assert pictures == sorted([ATTRIBUTE_CHART, "summary.json"] + [f"stage{i}-{s.name}.png"
                                                                  for i, s in enumerate(recipe.stages)])
