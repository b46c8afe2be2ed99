"""Recipes: the whole training schedule as one typed tree of dataclasses, read from YAML with dotted `--set`
overrides.

A recipe names the model, tokenizer and template, recipe-wide settings (images, precision, faults, …) and an ordered
list of stages. Each stage states only what differs from the stage before it: its mapping is deep-merged onto the
previous stage's, so stage 2 of mPLUG-Owl reads as "now LoRA on the LLM, vision and abstractor frozen, lr 2e-5, this
data mix". Every field has one default and a one-line docstring (recipe.py, stage.py); every value is checked
against its field's type on load, with errors naming the file and dotted path (typed.py); old key names still load,
with a warning naming the new one (renamed.py); `mmtrain config show` prints every field with its source (show.py).
"""

from mmtrain.config.load import load_raw, load_recipe, recipe_from_dict, resolve
from mmtrain.config.raw import apply_override, deep_merge, resolve_stages
from mmtrain.config.recipe import PRECISIONS, FaultSpec, ImageSpec, ModelSpec, Recipe
from mmtrain.config.renamed import DeprecatedName
from mmtrain.config.stage import (DataSource, LoaderSpec, LoraSpec, OptimizerSpec, ScheduleSpec, StageSpec,
                                  TrainParts)
from mmtrain.config.typed import FieldError, field_defaults, plain

__all__ = ["PRECISIONS", "DataSource", "DeprecatedName", "FaultSpec", "FieldError", "ImageSpec", "LoaderSpec",
           "LoraSpec", "ModelSpec", "OptimizerSpec", "Recipe", "ScheduleSpec", "StageSpec", "TrainParts",
           "apply_override", "deep_merge", "field_defaults", "load_raw", "load_recipe", "plain", "recipe_from_dict",
           "resolve", "resolve_stages"]
