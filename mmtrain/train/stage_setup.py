"""One stage, made ready: its starting weights, its DeepSpeed engine (ZeRO config, optimizer, schedule), its loader,
and, on a resume, both restored from the checkpoint. Collective: every rank calls `build_stage` together."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import deepspeed
import torch

from mmtrain.config import Recipe, StageSpec
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.stream import StreamLoader, build_loader
from mmtrain.errors import UserError
from mmtrain.model import VLMConfig, num_image_slots
from mmtrain.model.attention import resolve_attention
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.dsconfig import deepspeed_config, zero_stage
from mmtrain.train.flops import stage_flop_model
from mmtrain.train.run_context import RunContext, StageEngine
from mmtrain.train.safe_load import use_safe_loading
from mmtrain.train.stage_model import build_stage_model, initial_state, optimizer_and_schedule, stage_weights


def starting_weights(ctx: RunContext, index: int) -> dict[str, torch.Tensor]:
    """The weights stage `index` starts from: the recipe's initial model for the first stage, else the previous
    stage's exported weights from this run or from `--init-from`."""
    recipe = ctx.recipe
    if index == 0:
        return initial_state(recipe, ctx.config)
    previous = recipe.stages[index - 1]
    folder = previous_stage_dir(ctx, index)
    if folder is not None:
        return stage_weights(folder)
    raise UserError(f"stage {recipe.stages[index].name!r} starts from stage {previous.name!r}'s weights, "
                    f"but no complete {ctx.stage_dir(previous)} was found (pass --init-from RUN_DIR)")


def weights_source(ctx: RunContext, index: int) -> str:
    """Where stage `index`'s starting weights come from, in words, for errors that name them (every rank agrees)."""
    recipe = ctx.recipe
    if index == 0:
        spec = recipe.model
        if spec.init or spec.init_from_hf:
            return spec.init or spec.init_from_hf
        parts = [p for p in (spec.vision_path, spec.llm_path) if p]
        return " and ".join(parts) if parts else f"the initial {spec.preset} model"
    folder = previous_stage_dir(ctx, index)
    return str(folder) if folder is not None else f"stage {recipe.stages[index - 1].name}'s weights"


def previous_stage_dir(ctx: RunContext, index: int) -> Path | None:
    """The complete export of stage `index - 1`: this run's, else `--init-from`'s; None when neither has one."""
    previous = ctx.recipe.stages[index - 1]
    for root in (ctx.out, ctx.options.init_from):
        if root is not None and (ctx.stage_dir(previous, root) / ckpt.COMPLETE).is_file():
            return ctx.stage_dir(previous, root)
    return None


def loader_config(recipe: Recipe, stage: StageSpec, config: VLMConfig, image: ImageConfig) -> LoaderConfig:
    """The LoaderConfig a stage trains with: its data mixture, batch and length, the recipe's template, seed and
    fault policy, and the stage's `loader` knobs (every one, so LoaderConfig's defaults play no part)."""
    faults = recipe.faults
    fields = {"data": [{"shards": d.shards, "weight": d.weight} for d in stage.data],
              "num_image_slots": num_image_slots(config), "template": recipe.template,
              "batch_size": stage.micro_batch, "max_length": stage.max_length, "pack": stage.pack,
              "seed": recipe.seed, "image": image, "on_bad_sample": faults.on_bad_sample,
              "max_image_pixels": faults.max_image_pixels, **dataclasses.asdict(stage.loader)}
    return LoaderConfig(**fields)


def stage_loader(ctx: RunContext, stage: StageSpec) -> StreamLoader:
    """The stage's loader: this rank's share of its data mixture."""
    cfg = loader_config(ctx.recipe, stage, ctx.config, ctx.image_config)
    return build_loader(cfg, ctx.tokenizer, ctx.rank, ctx.world_size)


def build_stage(ctx: RunContext, index: int, ref: ckpt.CheckpointRef | None = None) -> StageEngine:
    """Stage `index`'s DeepSpeed engine and loader, restored from `ref` when given."""
    recipe, stage = ctx.recipe, ctx.recipe.stages[index]
    ctx.heartbeat.phase("build", stage=stage.name, stage_index=index, step=ref.step if ref else 0)
    ds_config = deepspeed_config(stage, ctx.world_size, ctx.precision)
    zero3 = zero_stage(ds_config) == 3
    # Frozen weights are the stage's starting weights; a resumed checkpoint then restores everything that trains.
    state = starting_weights(ctx, index) if ctx.rank == 0 or not zero3 else None
    attention = resolve_attention(recipe.attention, ctx.device.type, packed=stage.pack)
    model, trainable = build_stage_model(ctx.config, stage, ds_config, zero3, state, ctx.rank, recipe.seed + index,
                                         recipe.checkpointing(), recipe.kernels, attention, recipe.compile,
                                         weights_source(ctx, index))
    del state
    optimizer, scheduler, group_names = optimizer_and_schedule(model, stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    use_safe_loading(engine)
    flop_model = stage_flop_model(model, ctx.config, stage.train.vision, stage.train.connector, stage.train.llm)
    loader = stage_loader(ctx, stage)
    step, nonfinite = 0, []
    if ref is not None:
        _, client = engine.load_checkpoint(str(ctx.checkpoints), tag=ref.tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        loader.load_state_dict(ckpt.read_rank_state(ref.path, ctx.rank))
        step, nonfinite = ref.step, list((client or {}).get("nonfinite_steps", []))
    return StageEngine(engine, loader, stage, index, step, trainable, group_names, zero_stage(ds_config), nonfinite,
                       flop_model, attention)
