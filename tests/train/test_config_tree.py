"""The typed recipe tree: every field documented, one default per knob (the loader's and the shard builder's agree
with the recipe's), values checked on load with the dotted path named, old names moved with a warning."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import warnings
from pathlib import Path

import pytest

from mmtrain.cli import build_parser
from mmtrain.config import (DeprecatedName, FaultSpec, ImageSpec, LoaderSpec, Recipe, StageSpec, load_recipe,
                            recipe_from_dict)
from mmtrain.config.stage import LoraRole, Part
from mmtrain.config.typed import FieldError
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.shards.writer import BuildOptions
from mmtrain.errors import UserError
from mmtrain.model import lora

REPO = Path(__file__).resolve().parents[2]


def specs(cls: type = Recipe) -> list[type]:
    """`cls` and every spec class under it."""
    found = [cls]
    for hint in inspect.get_annotations(cls, eval_str=True).values():
        for candidate in (hint, *getattr(hint, "__args__", ())):
            if dataclasses.is_dataclass(candidate) and candidate not in found:
                found += [c for c in specs(candidate) if c not in found]
    return found


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string right after its annotation)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: nxt.value.value for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def test_every_field_of_the_tree_has_a_docstring() -> None:
    classes = specs()
    assert {c.__name__ for c in classes} == {"Recipe", "StageSpec", "TrainParts", "LoraSpec", "OptimizerSpec",
                                             "ScheduleSpec", "DataSource", "LoaderSpec", "ModelSpec", "ImageSpec",
                                             "FaultSpec"}
    undocumented = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
                    if not field_docs(c).get(f.name, "").strip()]
    assert undocumented == []


def defaults(cls: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_one_default_per_knob_across_recipe_loader_and_shard_builder() -> None:
    loader, spec = defaults(LoaderConfig), defaults(LoaderSpec)
    trainer_fills = {"data", "num_image_slots", "template", "batch_size", "max_length", "pack", "seed", "image",
                     "on_bad_sample", "max_image_pixels"}
    # every LoaderConfig knob is either the stage's loader spec or filled by the trainer from the recipe
    assert set(spec) == {f.name for f in dataclasses.fields(LoaderConfig)} - trainer_fills
    assert {name: loader[name] for name in spec} == spec
    stage, recipe, faults = defaults(StageSpec), defaults(Recipe), defaults(FaultSpec)
    assert (stage["micro_batch"], stage["max_length"], stage["pack"]) == (loader["batch_size"], loader["max_length"],
                                                                         loader["pack"]) == (4, 512, False)
    assert (recipe["seed"], recipe["template"]) == (loader["seed"], loader["template"])
    assert faults["on_bad_sample"] == loader["on_bad_sample"] == "skip"
    assert faults["max_image_pixels"] == loader["max_image_pixels"] == defaults(BuildOptions)["max_image_pixels"]
    assert spec["num_workers"] == 1  # what the trainer always used (it forced 1 where the recipe named none)
    image, image_spec = defaults(ImageConfig), defaults(ImageSpec)
    assert {k: v for k, v in image_spec.items() if v is not None} == {"augment": False, "hflip": False}
    assert ImageSpec().config_fields(image["size"]) == image  # unset: the tower's size, CLIP's mean and std
    assert typing_args(Part) == lora.PARTS and typing_args(LoraRole) == lora.ROLES


def typing_args(alias: object) -> tuple:
    return getattr(alias, "__args__")


def test_the_trainer_builds_its_loader_from_every_recipe_knob() -> None:
    from mmtrain.model.presets import preset_config
    from mmtrain.train.stage_setup import loader_config

    recipe = recipe_from_dict({"name": "r", "faults": {"on_bad_sample": "raise", "max_image_pixels": 99},
                               "stages": [{"name": "a", "data": ["x"], "micro_batch": 3, "max_length": 64,
                                           "loader": {"shuffle_buffer": 7}}]})
    image = ImageConfig(**recipe.image.config_fields(32))
    cfg = loader_config(recipe, recipe.stages[0], preset_config("tiny"), image)
    assert (cfg.num_workers, cfg.shuffle_buffer, cfg.on_bad_sample, cfg.max_image_pixels) == (1, 7, "raise", 99)
    assert (cfg.batch_size, cfg.max_length, cfg.image.size) == (3, 64, 32)
    assert dataclasses.asdict(recipe.stages[0].loader) == {k: getattr(cfg, k) for k in defaults(LoaderSpec)}


def error(raw_stage: dict, **top) -> str:
    with pytest.raises(UserError) as info:
        recipe_from_dict({"name": "r", **top, "stages": [{"name": "a", "data": ["x"]}, raw_stage]}, "recipe.yaml")
    return str(info.value)


def test_values_are_checked_against_their_types_with_the_dotted_path() -> None:
    assert error({"name": "b", "optimizer": {"lr": "abc"}}) == \
        "recipe.yaml: stages.1.optimizer.lr: expected a number, got 'abc'"
    assert error({"name": "b", "loader": {"group_by": "modality"}}) == \
        "recipe.yaml: stages.1.loader.group_by must be none or modality_length, not 'modality'"
    assert error({"name": "b", "loader": {"num_workers": 1.5}}) == \
        "recipe.yaml: stages.1.loader.num_workers: expected an integer, got 1.5"
    assert error({"name": "b", "pack": "yes"}) == "recipe.yaml: stages.1.pack: expected true or false, got 'yes'"
    assert error({"name": "b", "lora": {"roles": ["self_attn", "attn"]}}) == \
        "recipe.yaml: stages.1.lora.roles.1 must be self_attn, cross_attn, ffn or vision, not 'attn'"
    assert error({"name": "b", "optimizer": {"lr_per_part": {"vison": 1e-5}}}) == \
        "recipe.yaml: stages.1.optimizer.lr_per_part: unknown key 'vison' (keys: vision, connector or llm)"
    assert error({"name": "b", "loader": {"mode": "resampled"}}) == \
        "recipe.yaml: stages.1.loader.mode: resampled needs samples_per_epoch"
    assert error({"name": "b", "data": []}) == \
        "recipe.yaml: stages.1.data is empty: a stage needs a list of {shards: DIR, weight: W}"
    assert error({"name": "b", "pack": True, "loader": {"group_by": "modality_length"}}) == \
        "recipe.yaml: stages.1.loader.group_by: modality_length cannot be combined with pack: true"
    assert error({"name": "b", "loader": {"shuffle_bufer": 5}}) == (
        "recipe.yaml: stages.1.loader: unknown keys ['shuffle_bufer'] (known: ['drop_last', 'group_by', "
        "'group_window', 'mode', 'num_workers', 'pad_to_multiple', 'persistent_workers', 'pin_workers', "
        "'samples_per_epoch', 'shard_backoff', 'shard_cache', 'shard_retries', 'shard_timeout', 'shuffle', "
        "'shuffle_buffer', 'split', 'transfer_samples', 'truncate', 'uneven'])")
    assert error({"name": "b"}, image={"resize": "crop"}) == \
        "recipe.yaml: image.resize must be shortest or pad, not 'crop'"
    assert error({"name": "b"}, faults={"hang_timeout_s": "soon"}) == \
        "recipe.yaml: faults.hang_timeout_s: expected a number, got 'soon'"
    assert error({"name": "b"}, report_to=["tensorboard", "neptune"]) == \
        "recipe.yaml: report_to.1 must be tensorboard, wandb or mlflow, not 'neptune'"
    assert error({"name": "b"}, report_to=["wandb", "wandb"]) == "recipe.yaml: report_to names a tracker twice: " \
        "['wandb', 'wandb']"


def test_booleans_are_strict_and_never_numbers_and_unions_name_every_arm() -> None:
    for value in ("yes", "on", 1):
        assert error({"name": "b", "pack": value}) == \
            f"recipe.yaml: stages.1.pack: expected true or false, got {value!r}"
    assert error({"name": "b", "steps": True}) == "recipe.yaml: stages.1.steps: expected an integer, got True"
    assert error({"name": "b", "optimizer": {"betas": [0.9, False]}}) == \
        "recipe.yaml: stages.1.optimizer.betas.1: expected a number, got False"
    assert error({"name": "b", "train": {"vision": "yes"}}) == \
        "recipe.yaml: stages.1.train.vision: expected true or false or an integer, got 'yes'"
    assert error({"name": "b", "data": [{"shards": ["/x", 5]}]}) == \
        "recipe.yaml: stages.1.data.0.shards.1: expected a string, got 5"
    assert error({"name": "b"}, gradient_checkpointing={"llm": "on"}) == \
        "recipe.yaml: gradient_checkpointing.llm: expected true or false, got 'on'"
    assert error({"name": "b", "optimizer": {"betas": [0.9]}}) == \
        "recipe.yaml: stages.1.optimizer.betas: expected a list of 2 values, got [0.9]"
    assert error({"name": "b", "data": [{"weight": 2}]}) == "recipe.yaml: stages.1.data.0: missing shards"


def test_loose_yaml_numbers_are_taken_as_what_the_field_holds() -> None:
    recipe = recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["x"], "optimizer": {"lr": "3e-5"},
                                                        "loader": {"mode": "resampled", "samples_per_epoch": 1.0e7}}]})
    loader = recipe.stages[0].loader
    assert recipe.stages[0].optimizer.lr == 3e-5 and loader.samples_per_epoch == 10_000_000
    assert type(loader.samples_per_epoch) is int and recipe.stages[0].optimizer.betas == (0.9, 0.999)


def test_a_spec_made_in_python_is_checked_too() -> None:
    with pytest.raises(FieldError, match=r"^mode must be exact or resampled, not 'random'$"):
        LoaderSpec(mode="random")  # type: ignore[arg-type]


def loads_with_warnings(stages: list[dict], **top) -> tuple[Recipe, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = recipe_from_dict({"name": "r", **top, "stages": stages}, "recipe.yaml")
    return recipe, [str(w.message) for w in caught if issubclass(w.category, DeprecatedName)]


def test_old_names_load_with_a_warning_and_behave_as_the_new_ones() -> None:
    old, said = loads_with_warnings([{"name": "a", "data": ["x"], "log_every": 5,
                                      "loader": {"on_error": "raise", "max_image_pixels": 1000, "max_length": 99,
                                                 "num_workers": 2}},
                                     {"name": "b", "max_length": 300}])
    assert said == [
        "recipe.yaml: stages.0.loader.on_error is deprecated, use faults.on_bad_sample",
        "recipe.yaml: stages.0.loader.max_image_pixels is deprecated, use faults.max_image_pixels",
        "recipe.yaml: stages.0.loader.max_length is deprecated, use stages.0.max_length",
        "recipe.yaml: stages.0.log_every is ignored (every step is logged to metrics.jsonl); remove it",
    ]
    new, none = loads_with_warnings([{"name": "a", "data": ["x"], "max_length": 99, "loader": {"num_workers": 2}},
                                     {"name": "b", "max_length": 99}],
                                    faults={"on_bad_sample": "raise", "max_image_pixels": 1000})
    assert none == [] and old.to_dict() == new.to_dict()  # stage b inherits the old key, which wins as it did
    skip, said = loads_with_warnings([{"name": "a", "data": ["x"], "loader": {"on_error": "warn"}}])
    assert skip.faults.on_bad_sample == "skip"
    assert said == ["recipe.yaml: stages.0.loader.on_error is deprecated, use faults.on_bad_sample (on_error: warn "
                    "is on_bad_sample: skip)"]


def test_an_old_per_stage_name_for_a_recipe_wide_knob_must_agree_across_stages() -> None:
    with pytest.raises(UserError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecatedName)
        recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["x"]},
                                                  {"name": "b", "loader": {"on_error": "raise"}}]}, "recipe.yaml")
    assert str(info.value) == ("recipe.yaml: stages.1.loader.on_error (deprecated) makes faults.on_bad_sample 'raise' "
                               "in stage 'b' but 'skip' in stage 'a'; faults.on_bad_sample is recipe-wide: set it "
                               "there once")


def test_an_old_name_given_with_set_is_moved_too() -> None:
    with pytest.warns(DeprecatedName, match=r"stages\.0\.loader\.on_error is deprecated, use faults\.on_bad_sample"):
        recipe = load_recipe(REPO / "launch" / "recipes" / "owl-7b.yaml", ["stages.0.loader.on_error=raise"])
    assert recipe.faults.on_bad_sample == "raise"


def test_shards_build_takes_the_new_flag_and_the_old_one_with_a_warning(capsys) -> None:
    base = ["shards", "build", "--catalog", "c.csv", "--spec", "s.yaml", "--out", "o"]
    parser = build_parser()
    assert parser.parse_args(base).max_image_pixels == defaults(BuildOptions)["max_image_pixels"]
    assert parser.parse_args(base + ["--max-image-pixels", "7"]).max_image_pixels == 7
    with pytest.warns(FutureWarning, match="--max-pixels is deprecated, use --max-image-pixels"):
        assert parser.parse_args(base + ["--max-pixels", "5"]).max_image_pixels == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["shards", "build", "--help"])
    help_text = capsys.readouterr().out
    assert "--max-image-pixels" in help_text and "--max-pixels" not in help_text  # the old name is hidden
