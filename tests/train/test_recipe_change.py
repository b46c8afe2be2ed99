"""Resume with the recipe the run started with: the comparison of a checkpoint's recipe.yaml with the recipe given
now (pure), and a real 1-rank run refused on a changed lr, then let through with --allow-recipe-change."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtrain.config import recipe_from_dict
from mmtrain.errors import UserError
from mmtrain.launching import run_ranks
from mmtrain.train.checkpoint import latest_complete, mark_complete
from mmtrain.train.recipe_change import MISSING, Change, check_resume, is_free, recipe_changes, recipe_defaults

from train_helpers import stage, write_recipe


def recipe(**stage_fields):
    return recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["/x"], "optimizer": {"lr": 2e-3},
                                                      **stage_fields}]})


def changes(saved: dict, now) -> list[str]:
    return [str(c) for c in recipe_changes(saved, now.to_dict(), recipe_defaults(len(now.stages)))]


def test_every_differing_field_is_named_with_old_and_new_values() -> None:
    now = recipe(optimizer={"lr": 1e-3}, save_every=5, data=[{"shards": "/x", "weight": 2}])
    now.faults.hang_timeout_s = 60.0
    assert changes(recipe().to_dict(), now) == ["stages.0.optimizer.lr: 0.002 → 0.001",
                                                "stages.0.data.0.weight: 1.0 → 2.0",
                                                "stages.0.save_every: 0 → 5",
                                                "faults.hang_timeout_s: null → 60.0"]
    assert [is_free(p) for p in ("stages.0.optimizer.lr", "stages.0.data.0.weight", "stages.0.save_every",
                                 "faults.hang_timeout_s", "gradient_checkpointing.llm")] == [False, False, True,
                                                                                           True, True]


def test_a_key_the_saved_recipe_lacks_counts_as_its_default() -> None:
    saved = recipe().to_dict()
    del saved["faults"], saved["image"], saved["stages"][0]["loader"], saved["stages"][0]["lora"]["dropout"]
    saved["stages"][0]["loader"] = {"on_error": "warn"}  # an old name the tree no longer has: not compared
    assert changes(saved, recipe()) == []
    assert changes(saved, recipe(loader={"num_workers": 2})) == ["stages.0.loader.num_workers: 1 → 2"]


def test_a_checkpoint_saved_under_old_names_compares_as_the_new_ones(tmp_path: Path) -> None:
    saved = recipe().to_dict()
    saved["stages"][0]["loader"].update({"max_length": 99, "max_image_pixels": 1000})  # the old, untyped loader
    saved["stages"][0]["log_every"] = 10
    mark_complete(tmp_path, {"stage_index": 0, "stage": "a", "step": 2, "world_size": 1}, saved, None, {})
    now = recipe(max_length=99)
    now.faults.max_image_pixels = 1000
    assert check_resume(tmp_path, now, allow=False) == []
    assert changes(saved, now) == ["stages.0.max_length: 512 → 99", "faults.max_image_pixels: 64000000 → 1000"]


def test_free_form_mappings_and_lists_report_what_was_added_or_taken_away() -> None:
    saved = recipe_from_dict({"name": "r", "model": {"config": {"text_config": {"num_hidden_layers": 2}}},
                              "stages": [{"name": "a", "data": ["/x"]}]}).to_dict()
    now = recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["/x"]}, {"name": "b"}]})
    assert changes(saved, now) == ["stages: 1 entry → 2 entries", "model.config.text_config: {num_hidden_layers: 2} "
                                                                  "→ (absent)"]
    assert str(Change("x", MISSING, 1)) == "x: (absent) → 1"


def test_check_resume_refuses_a_training_change_and_lets_the_rest_through(tmp_path: Path) -> None:
    folder = tmp_path / "stage0-a-step0000002"
    folder.mkdir()
    mark_complete(folder, {"stage_index": 0, "stage": "a", "step": 2, "world_size": 1}, recipe().to_dict(), None, {})
    now = recipe(optimizer={"lr": 1e-3, "betas": [0.9, 0.98]}, save_every=5)
    with pytest.raises(UserError) as info:
        check_resume(folder, now, allow=False)
    assert str(info.value) == (f"--resume: the recipe differs from the one {folder / 'recipe.yaml'} was saved with, "
                               "in fields that alter training:\n"
                               "  stages.0.optimizer.lr: 0.002 → 0.001\n"
                               "  stages.0.optimizer.betas: [0.9, 0.999] → [0.9, 0.98]\n"
                               "--allow-recipe-change resumes with the new values anyway")
    assert check_resume(folder, now, allow=True) == [
        "recipe change (--allow-recipe-change): stages.0.optimizer.lr: 0.002 → 0.001",
        "recipe change (--allow-recipe-change): stages.0.optimizer.betas: [0.9, 0.999] → [0.9, 0.98]",
        "recipe change that does not alter training: stages.0.save_every: 0 → 5"]
    assert check_resume(folder, recipe(save_every=5), allow=False) == [
        "recipe change that does not alter training: stages.0.save_every: 0 → 5"]
    assert check_resume(folder, recipe(), allow=False) == []


def test_resume_refuses_a_changed_lr_unless_allowed(tiny_data, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", tiny_data, [
        stage("s", tiny_data, train={"vision": False, "connector": True, "llm": "frozen"}, optimizer={"lr": 2e-3},
              steps=4, save_every=2)])
    out = tmp_path / "run"
    args = ["--recipe", str(path), "--out", str(out)]
    first = run_ranks(1, args + ["--stop-after-steps", "2"], log=tmp_path / "first.log", timeout=300)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert latest_complete(out / "checkpoints").step == 2

    changed = args + ["--resume", "--set", "stages.0.optimizer.lr=1e-3", "--stop-after-steps", "1"]
    refused = run_ranks(1, changed, log=tmp_path / "refused.log", timeout=300)
    log = (tmp_path / "refused.log").read_text()
    assert refused.returncode != 0
    expected = "fields that alter training:\n  stages.0.optimizer.lr: 0.002 → 0.001\n--allow-recipe-change"
    assert expected in log, log[-3000:]

    allowed = run_ranks(1, changed + ["--allow-recipe-change"], log=tmp_path / "allowed.log", timeout=300)
    log = (tmp_path / "allowed.log").read_text()
    assert allowed.returncode == 0, log[-3000:]
    assert "recipe change (--allow-recipe-change): stages.0.optimizer.lr: 0.002 → 0.001" in log
    assert "resuming from" in log and latest_complete(out / "checkpoints").step == 2
