"""Checkpoints → HF directories: the VisionLanguageModel, its LLM alone (AutoModelForCausalLM), a peft adapter.

ZeRO-3 shards are consolidated by DeepSpeed's own `zero_to_fp32` machinery (no engine, no process group), so export
runs anywhere the checkpoint folder is, in a plain process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig

from mmtrain.errors import UserError
from mmtrain.model import VLMConfig
from mmtrain.model.llava_layout import write_llava_dir
from mmtrain.model.lora import lora_config_from, merge_lora, split_lora, write_adapter
from mmtrain.model.remote_code import write_image_processor, write_remote_code
from mmtrain.model.weights_io import WEIGHTS_NAME, save_weights
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.zero import gathered_state_dict

LLM_SUBDIR = "llm"
ADAPTER_SUBDIR = "adapter"


def write_model_dir(state: dict[str, torch.Tensor], config: VLMConfig, out: Path,
                    tokenizer_dir: str | os.PathLike | None, template: str | None = None,
                    image_config: dict[str, Any] | None = None, for_transformers: bool = False) -> None:
    """A VisionLanguageModel directory, plus `llm/` that `AutoModelForCausalLM.from_pretrained` loads on its own.

    `for_transformers`: the directory also opens in transformers alone (`write_vlm_for_transformers`).
    `mmtrain.json` (chat template) and `image_processor.json` (the trainer's preprocessing) go beside the weights,
    so eval / generate / chat use exactly what training used without being told."""
    out.mkdir(parents=True, exist_ok=True)
    if not (for_transformers and config.connector == "mlp"):  # a LLaVA export writes its own config and weights
        config.save_pretrained(out)
        save_weights(state, out / WEIGHTS_NAME)
    llm_dir = out / LLM_SUBDIR
    llm_dir.mkdir(exist_ok=True)
    text = dict(config.text_config)
    AutoConfig.for_model(**text).save_pretrained(str(llm_dir))
    llm_state = {k[len("llm."):]: v.contiguous() for k, v in state.items() if k.startswith("llm.")}
    if text.get("tie_word_embeddings"):
        llm_state.pop("lm_head.weight", None)
    save_weights({k: v.clone() for k, v in llm_state.items()}, llm_dir / WEIGHTS_NAME)
    if template:
        ckpt.write_json_atomic(out / "mmtrain.json", {"template": template})
    if image_config:
        ckpt.write_json_atomic(out / "image_processor.json", image_config)
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        for target in (out, llm_dir):
            for item in Path(tokenizer_dir).iterdir():
                if item.is_file():
                    shutil.copy2(item, target / item.name)
    if for_transformers:
        write_vlm_for_transformers(state, config, out, tokenizer_dir, image_config)


def write_vlm_for_transformers(state: dict[str, torch.Tensor], config: VLMConfig, out: Path,
                               tokenizer_dir: str | os.PathLike | None, image_config: dict[str, Any] | None) -> None:
    """Make a model directory open in transformers without mmtrain. The mlp connector is LLaVA: the directory becomes
    a LlavaForConditionalGeneration with its processor (config.json and model.safetensors in LLaVA's layout, which
    mmtrain reads back too). Other connectors keep our layout and carry their modeling code
    (`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`) and an image processor of the trainer's
    settings (`AutoImageProcessor`)."""
    if config.connector == "mlp":
        tokenizer = Path(tokenizer_dir) if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
        write_llava_dir(state, config, out, tokenizer, image_config)
        return
    write_remote_code(out, config)
    if image_config:
        write_image_processor(out, image_config)


def _atomic_dir(out: Path):
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def save_stage_weights(module: torch.nn.Module, out: Path, rank: int, tokenizer_dir: str | None,
                       template: str | None = None, image_config: dict[str, Any] | None = None) -> None:
    """Collective: the stage's final weights (LoRA merged) as a model directory that the next stage starts from."""
    state = gathered_state_dict(module, rank)
    if rank != 0:
        return
    lora = getattr(module, "lora_config", None)
    if lora is not None:
        state = merge_lora(state, lora)
    tmp = _atomic_dir(out)
    write_model_dir(state, module.config, tmp, tokenizer_dir, template, image_config)
    ckpt.write_json_atomic(tmp / ckpt.COMPLETE, {"weights": WEIGHTS_NAME, "lora_merged": lora is not None})
    _move_into_place(tmp, out)


def consolidate(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 weights of a complete checkpoint (any ZeRO stage) and its trainer state, in a plain process."""
    if not (checkpoint / ckpt.COMPLETE).is_file():
        raise UserError(f"{checkpoint} is not a complete mmtrain checkpoint (no {ckpt.COMPLETE})")
    trainer_state = ckpt.read_trainer_state(checkpoint)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # as in zero.py: doctor-safe

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return dict(state), trainer_state


def export_checkpoint(checkpoint: Path, out: Path, merge: bool = False) -> Path:
    """HF directory from a checkpoint: base weights + `adapter/` (peft) when the stage trained LoRA, or, with
    `merge`, LoRA folded into the weights and no adapter."""
    checkpoint, out = Path(checkpoint), Path(out)
    state, trainer_state = consolidate(checkpoint)
    config = VLMConfig.from_dict(trainer_state["model_config"])
    tokenizer = checkpoint / "tokenizer"
    lora = trainer_state.get("lora")
    template = yaml.safe_load((checkpoint / "recipe.yaml").read_text(encoding="utf-8")).get("template")
    image_config = json.loads((checkpoint / "image_processor.json").read_text(encoding="utf-8"))
    extras = {"template": template, "image_config": image_config, "for_transformers": True}
    has_lora = any(".lora_" in k for k in state)
    tmp = _atomic_dir(out)
    if has_lora and merge:
        write_model_dir(merge_lora(state, lora_config_from(lora, state)), config, tmp, tokenizer, **extras)
    elif has_lora:
        base, adapter = split_lora(state)
        write_model_dir(base, config, tmp, tokenizer, **extras)
        write_adapter(adapter, lora_config_from(lora, state), tmp / ADAPTER_SUBDIR)
    else:
        write_model_dir(state, config, tmp, tokenizer, **extras)
    ckpt.write_json_atomic(tmp / "export.json", {"checkpoint": str(checkpoint), "stage": trainer_state["stage"],
                                                 "step": trainer_state["step"], "lora_merged": bool(has_lora and merge),
                                                 "adapter": bool(has_lora and not merge)})
    _move_into_place(tmp, out)
    return out
