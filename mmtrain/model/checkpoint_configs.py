"""A model's part configs read from the checkpoints a user already has: the vision tower's and the LLM's
`config.json` (through transformers' AutoConfig), so any family transformers knows is described by its own files,
never by a hand-written copy. A CLIP or SigLIP directory gives its vision part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from mmtrain.errors import UserError
from mmtrain.model.config import VLMConfig
from mmtrain.model.llm import llm_class
from mmtrain.model.vision import vision_class, vision_sub_config

META_KEYS = ("architectures", "transformers_version", "_name_or_path", "_commit_hash", "auto_map")
"""Bookkeeping in a saved config.json that describes the file, not the model."""
STORAGE_KEYS = ("dtype", "torch_dtype")
"""The dtype a checkpoint was saved in: not part of the model (transformers would build the parts in it, fp16 for many
hub configs); the trainer chooses the precision."""


def _read(path: str | Path, part: str) -> dict[str, Any]:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"model.{part}_path {folder}: no config.json (a local HF checkpoint directory is expected)")
    try:
        config = AutoConfig.from_pretrained(str(folder)).to_dict()
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model.{part}_path {folder}/config.json: transformers cannot read it: {exc}") from exc
    return {k: v for k, v in config.items() if k not in META_KEYS + STORAGE_KEYS}


def vision_config_from(path: str | Path) -> dict[str, Any]:
    """The vision tower's config dict (the vision part of a full CLIP / SigLIP config)."""
    config = {k: v for k, v in vision_sub_config(_read(path, "vision")).items() if k not in META_KEYS + STORAGE_KEYS}
    try:
        vision_class(config)
    except ValueError as exc:
        raise UserError(f"model.vision_path {path}: {exc}") from None
    return config


def text_config_from(path: str | Path) -> dict[str, Any]:
    """The LLM's config dict; refused when transformers has no causal-LM class for its model_type."""
    config = _read(path, "llm")
    try:
        llm_class(config)
    except UserError as exc:
        raise UserError(f"model.llm_path {path}: {exc}") from None
    return config


def checkpoint_config(connector: str, vision_path: str, llm_path: str, **fields: Any) -> VLMConfig:
    """A VLMConfig whose parts are the checkpoints' own configs and whose connector has its default options
    (`fields`: any other VLMConfig field, e.g. connector_config, vision_select_layer)."""
    return VLMConfig(connector=connector, vision_config=vision_config_from(vision_path),
                     text_config=text_config_from(llm_path), vision_path=str(vision_path), llm_path=str(llm_path),
                     **fields)
