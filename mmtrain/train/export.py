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
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoConfig

from mmtrain.errors import UserError
from mmtrain.model import VLMConfig
from mmtrain.model.vlm import WEIGHTS_NAME
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.zero import gathered_state_dict

ADAPTER_NAME = "default"
LLM_SUBDIR = "llm"
ADAPTER_SUBDIR = "adapter"


def _lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})


def merge_lora(state: dict[str, torch.Tensor], r: int, alpha: float) -> dict[str, torch.Tensor]:
    """Fold every LoRA pair into its base weight: W + (B @ A) · alpha / r; peft's wrapper names removed."""
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for module in _lora_modules(state):
        a = state[f"{module}.lora_A.{ADAPTER_NAME}.weight"].float()
        b = state[f"{module}.lora_B.{ADAPTER_NAME}.weight"].float()
        weight = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.float() + (b @ a) * (alpha / r)).to(weight.dtype)
    return merged


def split_lora(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights under plain names, LoRA weights under peft's adapter file names)."""
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    adapter = {"base_model.model." + k.replace(f".{ADAPTER_NAME}.", "."): v for k, v in state.items() if ".lora_" in k}
    return base, adapter


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Tied tensors (same storage) are stored once, the other names listed as aliases, as the model's loader reads."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def write_model_dir(state: dict[str, torch.Tensor], config: VLMConfig, out: Path,
                    tokenizer_dir: str | os.PathLike | None, template: str | None = None,
                    image_config: dict[str, Any] | None = None) -> None:
    """A VisionLanguageModel directory, plus `llm/` that `AutoModelForCausalLM.from_pretrained` loads on its own.

    `mmtrain.json` (chat template) and `image_processor.json` (the trainer's preprocessing) go beside the weights,
    so eval / generate / chat use exactly what training used without being told."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    _save_safetensors(state, out / WEIGHTS_NAME)
    llm_dir = out / LLM_SUBDIR
    llm_dir.mkdir(exist_ok=True)
    text = dict(config.text_config)
    AutoConfig.for_model(**text).save_pretrained(str(llm_dir))
    llm_state = {k[len("llm."):]: v.contiguous() for k, v in state.items() if k.startswith("llm.")}
    if text.get("tie_word_embeddings"):
        llm_state.pop("lm_head.weight", None)
    save_file({k: v.clone() for k, v in llm_state.items()}, str(llm_dir / "model.safetensors"), metadata={"format": "pt"})
    if template:
        ckpt.write_json_atomic(out / "mmtrain.json", {"template": template})
    if image_config:
        ckpt.write_json_atomic(out / "image_processor.json", image_config)
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        for target in (out, llm_dir):
            for item in Path(tokenizer_dir).iterdir():
                if item.is_file():
                    shutil.copy2(item, target / item.name)


def write_adapter(adapter: dict[str, torch.Tensor], lora: dict[str, Any], out: Path) -> None:
    """peft's format: adapter_config.json + adapter_model.safetensors (loadable by PeftModel.from_pretrained)."""
    modules = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in adapter})
    LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0), target_modules=modules,
               bias="none").save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})


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
        state = merge_lora(state, lora.r, lora.lora_alpha)
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
    extras = {"template": template, "image_config": image_config}
    has_lora = any(".lora_" in k for k in state)
    tmp = _atomic_dir(out)
    if has_lora and merge:
        write_model_dir(merge_lora(state, lora["r"], lora["alpha"]), config, tmp, tokenizer, **extras)
    elif has_lora:
        base, adapter = split_lora(state)
        write_model_dir(base, config, tmp, tokenizer, **extras)
        write_adapter(adapter, lora, tmp / ADAPTER_SUBDIR)
    else:
        write_model_dir(state, config, tmp, tokenizer, **extras)
    ckpt.write_json_atomic(tmp / "export.json", {"checkpoint": str(checkpoint), "stage": trainer_state["stage"],
                                                 "step": trainer_state["step"], "lora_merged": bool(has_lora and merge),
                                                 "adapter": bool(has_lora and not merge)})
    _move_into_place(tmp, out)
    return out
