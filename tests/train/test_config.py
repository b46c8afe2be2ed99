"""Recipes and DeepSpeed configs: every shipped file loads; stages inherit; overrides; "auto" filled and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtrain.config import load_recipe, recipe_from_dict
from mmtrain.errors import UserError
from mmtrain.train.dsconfig import deepspeed_config, zero_stage

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_and_its_deepspeed_configs_load(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for stage in recipe.stages:
        config = deepspeed_config(stage, world_size=8, precision="bf16")
        assert config["train_batch_size"] == stage.micro_batch * stage.grad_accum * 8
        assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
        assert "auto" not in json.dumps(config)


def test_owl_recipe_is_the_paper_schedule() -> None:
    owl = load_recipe(REPO / "launch" / "recipes" / "owl-7b.yaml")
    pre, instruct = owl.stages
    assert (pre.train.vision, pre.train.connector, pre.train.llm) == (True, True, "frozen")
    assert (pre.optimizer.lr, pre.optimizer.weight_decay, pre.schedule.warmup_steps) == (1e-4, 0.1, 2000)
    assert (instruct.train.vision, instruct.train.connector, instruct.train.llm) == (False, False, "lora")
    assert instruct.lora.r == 8 and instruct.optimizer.lr == 2e-5
    assert [(d.weight) for d in instruct.data] == [0.7, 0.3]
    # inherited from stage 1 because stage 2 does not restate them
    assert instruct.optimizer.betas == (0.9, 0.98) and instruct.schedule.min_lr_ratio == 0.1
    assert instruct.optimizer.weight_decay == 0.0  # … unless it does


def test_overrides_reach_any_field_and_parse_values(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "launch" / "recipes" / "tiny-cpu.yaml",
                         ["stages.1.optimizer.lr=3e-5", "stages.0.train.vision=2", "seed=7", "model.connector=mlp"])
    assert recipe.stages[1].optimizer.lr == 3e-5 and recipe.stages[0].optimizer.lr == 4e-3
    assert recipe.stages[0].train.vision == 2 and recipe.seed == 7 and recipe.model.connector == "mlp"
    with pytest.raises(UserError, match="has no item 5"):
        load_recipe(REPO / "launch" / "recipes" / "tiny-cpu.yaml", ["stages.5.steps=1"])


def test_unknown_keys_and_bad_values_name_where() -> None:
    base = {"name": "r", "stages": [{"name": "a", "data": ["x"], "optimizr": {"lr": 1}}]}
    with pytest.raises(UserError, match=r"stages\.0: unknown keys \['optimizr'\]"):
        recipe_from_dict(base)
    with pytest.raises(UserError, match="llm must be frozen, lora or full"):
        recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["x"], "train": {"llm": "half"}}]})
    with pytest.raises(UserError, match="needs lora.roles"):
        recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["x"], "train": {"llm": "lora"}}]})
    with pytest.raises(UserError, match="attention must be auto, sdpa, flex or flash_varlen, not 'flash'"):
        recipe_from_dict({"name": "r", "attention": "flash", "stages": [{"name": "a", "data": ["x"]}]})
    defaults = recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["x"]}]})
    assert (defaults.attention, defaults.compile) == ("auto", False)


def test_explicit_deepspeed_values_must_agree_with_the_recipe(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}}))
    recipe = recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["x"], "micro_batch": 4,
                                                        "deepspeed": str(ds)}]})
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu is 16 but the recipe gives 4"):
        deepspeed_config(recipe.stages[0], 2, "fp32")
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(UserError, match="remove the 'optimizer' block"):
        deepspeed_config(recipe.stages[0], 2, "fp32")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    config = deepspeed_config(recipe.stages[0], 2, "fp32")
    assert zero_stage(config) == 3 and config["train_batch_size"] == 8 and config["bf16"]["enabled"] is False
