"""One stage's model, optimizer and schedule: built partitioned (ZeRO-3) and loaded from the previous stage's weights.

Why a fresh model per stage: each stage has its own trainable set and LoRA layout, and DeepSpeed binds an engine to
one set of parameters. Stage N's final weights (LoRA merged) are saved as a VisionLanguageModel directory, and stage
N+1 loads them into a newly built, partitioned model, so a hand-off within a run and a start from an earlier run's
directory are the same path.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from mmtrain.config import Recipe, StageSpec
from mmtrain.data.loader.image_token import image_token_id
from mmtrain.data.loader.images import ImageConfig, processor_settings
from mmtrain.errors import UserError
from mmtrain.model import VisionLanguageModel, VLMConfig, apply_stage_policy, preset_config
from mmtrain.model.checkpoint_configs import checkpoint_config
from mmtrain.model.compile import compile_decoder_blocks
from mmtrain.model.llava_layout import config_from_llava, state_from_llava
from mmtrain.model.lora import trainable_parameter_groups
from mmtrain.model.weights_io import WEIGHTS_NAME, read_weights
from mmtrain.train.zero import load_into, partitioned_build


def model_config(recipe: Recipe, tokenizer: Any) -> VLMConfig:
    """The recipe's model config, with token ids (and, for models trained from scratch, the vocabulary) set from
    the tokenizer, so the image placeholder id can never disagree between data and model."""
    spec = recipe.model
    if spec.init:
        return VLMConfig.from_pretrained(spec.init)
    if spec.init_from_hf:
        return _llava_config(spec.init_from_hf, tokenizer)

    if spec.preset:
        config = preset_config(spec.preset, spec.vision_path, spec.llm_path)
    elif spec.vision_path and spec.llm_path and spec.connector:
        config = checkpoint_config(spec.connector, spec.vision_path, spec.llm_path)
    else:
        raise UserError("model: name a preset, or a connector with vision_path and llm_path (the checkpoints' own "
                        "configs), or init (a saved mmtrain model), or init_from_hf (a LLaVA directory)")
    raw = config.to_dict()
    if spec.connector:
        if spec.connector != config.connector:
            raw["connector_config"] = {}
        raw["connector"] = spec.connector
    for key, value in spec.config.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    text = raw["text_config"]
    if not spec.llm_path or len(tokenizer) > text["vocab_size"]:
        # From scratch, or a pretrained LLM whose tokenizer gained tokens (<image>, <pad>): the vocabulary is the
        # tokenizer's, rounded up for matmul shapes; a pretrained embedding table grows to it (vlm._fit_vocabulary).
        text["vocab_size"] = int(math.ceil(len(tokenizer) / 64) * 64)
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            text[f"{name}_token_id"] = int(token_id)
    raw["image_token_id"] = image_token_id(tokenizer)
    return VLMConfig.from_dict(raw)


def _llava_config(folder: str, tokenizer: Any) -> VLMConfig:
    """A LLaVA directory's config, refused when the tokenizer disagrees with it: its `<image>` must be the
    config's image token and its ids must fit the embedding table (the weights fix the vocabulary)."""
    config = config_from_llava(folder)
    ours, vocab = image_token_id(tokenizer), int(config.text_config["vocab_size"])
    if ours != config.image_token_id:
        raise UserError(f"the tokenizer's <image> is id {ours}, but model.init_from_hf {folder}'s image token is id "
                        f"{config.image_token_id}: use the LLaVA directory's own tokenizer")
    if len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, but model.init_from_hf {folder} has vocab_size "
                        f"{vocab}: use the LLaVA directory's own tokenizer")
    return config


def image_config(recipe: Recipe, config: VLMConfig) -> ImageConfig:
    """How pixels reach this model's tower: the recipe's `image` settings, else the preprocessor settings of the
    tower checkpoint or of the LLaVA directory (mean, std, resize), else CLIP's; the size is the tower's image_size."""
    source = config.vision_path or recipe.model.init_from_hf
    processor = processor_settings(source) if source else {}
    return ImageConfig(**recipe.image.config_fields(config.vision_config.get("image_size", 224), processor))


def initial_state(recipe: Recipe, config: VLMConfig) -> dict[str, torch.Tensor]:
    """Stage 0's starting weights (rank 0 only): a model directory, a LLaVA directory's weights under our names,
    the preset's pretrained parts, or a seeded init."""
    if recipe.model.init:
        return _read_weights(Path(recipe.model.init))
    if recipe.model.init_from_hf:
        return state_from_llava(recipe.model.init_from_hf, config)
    torch.manual_seed(recipe.seed)
    pretrained = bool(config.vision_path or config.llm_path)
    return VisionLanguageModel.from_config(config, pretrained=pretrained).state_dict()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"{folder}: no {WEIGHTS_NAME} (not a VisionLanguageModel directory)")
    return read_weights(folder)


def stage_weights(folder: Path) -> dict[str, torch.Tensor]:
    return _read_weights(folder)


def _no_init_weights():
    """HF's own switch for building a model whose weights are loaded next (its init cannot run on ZeRO-3 slices)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4.x
    return no_init_weights()


def build_stage_model(config: VLMConfig, stage: StageSpec, ds_config: dict[str, Any] | None, zero3: bool,
                      state: dict[str, torch.Tensor] | None, rank: int, seed: int,
                      checkpointing: dict[str, bool], kernels: str = "plain", attention: str = "sdpa",
                      compile_blocks: bool = False, source: str = "the starting weights"
                      ) -> tuple[VisionLanguageModel, dict[str, int]]:
    """Build (partitioned under ZeRO-3), load `state` (needed on rank 0 only under ZeRO-3), apply the freeze policy.
    `attention` is a resolved implementation (`mmtrain.model.attention.resolve_attention`).

    LoRA layers are injected after the partitioned build and before `deepspeed.initialize`, from the same seed on
    every rank, so all ranks start from identical adapters (DeepSpeed partitions them at initialize).
    """
    with partitioned_build(config, ds_config, zero3), _no_init_weights():
        model = VisionLanguageModel.from_config(config, pretrained=False)  # weights come from `state` below
    load_into(model, state or {}, rank, zero3, source)  # `source` names the weights in its errors
    enable_checkpointing(model, checkpointing)
    if kernels == "liger":
        apply_liger(model)
    model.set_attention(attention)
    torch.manual_seed(seed)
    counts = apply_stage_policy(model, vision=stage.train.vision, connector=stage.train.connector,
                                llm=stage.train.llm, lora_roles=stage.lora.roles, r=stage.lora.r,
                                alpha=stage.lora.alpha, dropout=stage.lora.dropout)
    if not any(counts.values()):
        raise UserError(f"stage {stage.name!r} trains nothing (vision, connector and llm all frozen)")
    if compile_blocks:
        check_compile(stage, zero3)
        compile_decoder_blocks(model.llm)
    return model, counts


def check_compile(stage: StageSpec, zero3: bool) -> None:
    """`compile: true` runs under ZeRO stages 0-2 only: ZeRO-3 gathers parameters in module hooks that
    torch.compile cannot trace (pytorch issue #115484)."""
    if zero3:
        raise UserError(f"stage {stage.name!r}: compile: true needs ZeRO stage 0-2, and {stage.deepspeed} is ZeRO-3 "
                        "(torch.compile cannot trace its parameter-gathering hooks); use ds_configs/zero2.json there "
                        "or compile: false")


def enable_checkpointing(model: VisionLanguageModel, parts: dict[str, bool]) -> None:
    """Gradient checkpointing per part, through HF's own switch (non-reentrant: works with frozen inputs and ZeRO-3)."""
    for part, module in (("llm", model.llm), ("vision", model.vision.model)):
        if parts.get(part):
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_liger(model: VisionLanguageModel) -> bool:
    """liger-kernel's fused kernels on the LLM, in place; False (with a warning) when they cannot run here."""
    if not torch.cuda.is_available():
        warnings.warn("kernels: liger needs a CUDA GPU; training with the plain modules")
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        warnings.warn("kernels: liger, but liger-kernel is not installed (pip install mmtrain[gpu]); plain modules")
        return False
    _apply_liger_kernel_to_instance(model=model.llm)
    return True


def optimizer_and_schedule(model: VisionLanguageModel, stage: StageSpec
                           ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, list[str]]:
    """AdamW over the stage's trainable parameters only, one group per part (each with its own lr), and linear warmup
    then cosine decay to `min_lr_ratio`. Biases and norms get no weight decay."""
    opt = stage.optimizer
    groups, names = [], []
    for part, params in trainable_parameter_groups(model).items():
        if not params:
            continue
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for kind, members, wd in (("decay", decay, opt.weight_decay), ("no_decay", no_decay, 0.0)):
            if members:
                groups.append({"params": members, "lr": opt.lr_of(part), "weight_decay": wd})
                names.append(f"{part}/{kind}")
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
    warmup, total, floor = stage.schedule.warmup_steps, stage.steps, stage.schedule.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), names
