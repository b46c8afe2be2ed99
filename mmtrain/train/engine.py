"""The trainer: `deepspeed.initialize` per stage, the two-stage schedule, complete checkpoints, exact resume.

Run as `deepspeed --num_gpus N -m mmtrain.train --recipe R.yaml --out DIR` (or under torchrun / srun: rank and world
size come from the environment). The only module besides the loader that knows about ranks.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mmtrain.config import Recipe, StageSpec
from mmtrain.data.images import ImageConfig
from mmtrain.data.stream import LoaderConfig, build_loader
from mmtrain.data.tokenizer import load_tokenizer
from mmtrain.errors import UserError
from mmtrain.model import VLMConfig, num_image_slots
from mmtrain.train import checkpoint as ckpt
from mmtrain.train import preemption
from mmtrain.train.export import save_stage_weights
from mmtrain.train.dsconfig import deepspeed_config, resolve_precision, zero_stage
from mmtrain.train.logging import MetricsLogger
from mmtrain.train.stage_model import (build_stage_model, initial_state, model_config, optimizer_and_schedule,
                                       stage_weights)

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_slots", "position_ids")


@dataclass
class RunOptions:
    out: Path
    resume: bool = False
    start_stage: str | None = None
    """Start at this stage; its starting weights come from `init_from` (or this run's earlier stage)."""
    init_from: Path | None = None
    """A run directory whose `stages/<previous stage>` holds the weights to start `start_stage` from."""
    stop_after_steps: int | None = None
    """Testing aid: stop (without a final save) after this many optimizer steps in this process."""
    tensorboard: bool = True


@dataclass
class StageResult:
    name: str
    trainable: dict[str, int]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class StageEngine:
    engine: Any
    loader: Any
    stage: StageSpec
    index: int
    step: int
    trainable: dict[str, int]
    group_names: list[str]
    zero_stage: int


class _Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly.
    (`python -m mmtrain.train` installs the handlers before its imports: a signal during start-up counts too.)"""

    def __init__(self) -> None:
        preemption.install()

    @property
    def requested(self) -> bool:
        return preemption.requested


def _quiet_libraries() -> None:
    """DeepSpeed's INFO lines and torch's deprecation notices from inside DeepSpeed drown the progress bar."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up (deepspeed, torchrun or srun); a plain run is world size 1."""
    import deepspeed

    _quiet_libraries()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun without a launcher
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _forever(loader) -> Iterator[dict]:
    while True:
        yield from loader


def _model_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    inputs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    if "segment_ids" in batch and "position_ids" in inputs:  # packed rows: attention stays within each sample
        from mmtrain.data.collate import block_causal_mask

        inputs["attention_mask"] = block_causal_mask(batch["segment_ids"], dtype)
    out = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


class Trainer:
    """Runs a recipe's stages in order on this rank."""

    def __init__(self, recipe: Recipe, options: RunOptions) -> None:
        self.recipe, self.options = recipe, options
        self.out = options.out
        self.rank, self.world_size, self.device = init_distributed()
        self.precision = resolve_precision(recipe.precision, self.device.type)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        if not recipe.tokenizer:
            raise UserError("the recipe names no tokenizer (tokenizer: DIR)")
        if not Path(recipe.tokenizer).is_dir():
            raise UserError(f"tokenizer directory {recipe.tokenizer} does not exist (mmtrain tokenizer train ...)")
        self.tokenizer = load_tokenizer(recipe.tokenizer)
        self.config: VLMConfig = model_config(recipe, self.tokenizer)
        self.image_config = ImageConfig(**{"size": self.config.vision_config.get("image_size", 224), **recipe.image})
        self.metrics = MetricsLogger(self.out, self.rank, options.tensorboard)
        self.preemption = _Preemption()
        self.results: list[StageResult] = []
        self.steps_this_process = 0

    def image_config_json(self) -> dict[str, Any]:
        return {**self.image_config.__dict__, "mean": list(self.image_config.mean), "std": list(self.image_config.std)}

    # ---- paths --------------------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def stage_dir(self, stage: StageSpec, root: Path | None = None) -> Path:
        return (root or self.out) / "stages" / stage.name

    # ---- the schedule -------------------------------------------------------------------------------------------
    def run(self) -> list[StageResult]:
        first, resume_ref = self._starting_point()
        for index in range(first, len(self.recipe.stages)):
            ref = resume_ref if resume_ref is not None and resume_ref.stage_index == index else None
            if not self._run_stage(index, ref):
                break  # preempted or stopped: the checkpoint is written, a later --resume continues
        self.metrics.close()
        dist.barrier()
        return self.results

    def _starting_point(self) -> tuple[int, ckpt.CheckpointRef | None]:
        if self.options.resume:
            ref = ckpt.latest_complete(self.checkpoints)
            if ref is not None:
                self.metrics.print(f"resuming from {ref.path} (stage {ref.stage}, step {ref.step})")
                return ref.stage_index, ref
            self.metrics.print(f"--resume: no complete checkpoint under {self.checkpoints}; starting fresh")
        if self.options.start_stage:
            return self.recipe.stage_index(self.options.start_stage), None
        return 0, None

    def _starting_weights(self, index: int) -> dict[str, torch.Tensor] | None:
        """Rank 0 (or every rank without ZeRO-3) reads the weights this stage starts from."""
        if index == 0:
            return initial_state(self.recipe, self.config)
        previous = self.recipe.stages[index - 1]
        for root in (self.out, self.options.init_from):
            if root is not None and (self.stage_dir(previous, root) / ckpt.COMPLETE).is_file():
                return stage_weights(self.stage_dir(previous, root))
        raise UserError(f"stage {self.recipe.stages[index].name!r} starts from stage {previous.name!r}'s weights, "
                        f"but no complete {self.stage_dir(previous)} was found (pass --init-from RUN_DIR)")

    def _loader(self, stage: StageSpec, slots: int):
        fields = {"data": [{"shards": d.shards, "weight": d.weight} for d in stage.data], "num_image_slots": slots,
                  "template": self.recipe.template, "batch_size": stage.micro_batch, "max_length": stage.max_length,
                  "pack": stage.pack, "seed": self.recipe.seed, "image": self.image_config, "num_workers": 1}
        fields.update(stage.loader)
        return build_loader(LoaderConfig(**fields), self.tokenizer, self.rank, self.world_size)

    def build_engine(self, index: int, ref: ckpt.CheckpointRef | None = None) -> "StageEngine":
        """Stage `index`'s DeepSpeed engine and loader, restored from `ref` when given. Collective."""
        import deepspeed

        stage = self.recipe.stages[index]
        ds_config = deepspeed_config(stage, self.world_size, self.precision)
        zero3 = zero_stage(ds_config) == 3
        # Frozen weights are the stage's starting weights; a resumed checkpoint then restores everything that trains.
        state = self._starting_weights(index) if self.rank == 0 or not zero3 else None
        model, trainable = build_stage_model(self.config, stage, ds_config, zero3, state, self.rank,
                                             self.recipe.seed + index, self.recipe.gradient_checkpointing)
        del state
        optimizer, scheduler, group_names = optimizer_and_schedule(model, stage)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        loader = self._loader(stage, num_image_slots(self.config))
        step = 0
        if ref is not None:
            engine.load_checkpoint(str(self.checkpoints), tag=ref.tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            loader.load_state_dict(ckpt.read_rank_state(ref.path, self.rank))
            step = ref.step
        return StageEngine(engine, loader, stage, index, step, trainable, group_names, zero_stage(ds_config))

    def _run_stage(self, index: int, ref: ckpt.CheckpointRef | None) -> bool:
        run = self.build_engine(index, ref)
        stage = run.stage
        result = StageResult(stage.name, run.trainable)
        self.results.append(result)
        self.metrics.print(f"stage {stage.name}: trainable {run.trainable}, ZeRO-{run.zero_stage}, {self.precision}, "
                           f"{self.world_size} rank(s), global batch {stage.global_batch(self.world_size)}")
        self.metrics.stage_event({"stage": stage.name, "stage_index": index, "start_step": run.step,
                                  "trainable": run.trainable, "zero_stage": run.zero_stage,
                                  "precision": self.precision, "world_size": self.world_size})
        self.metrics.start_stage(stage.name, stage.steps, run.step)
        finished = self._loop(run.engine, run.loader, stage, index, run.step, result, run.group_names)
        if finished:
            self._finish_stage(run.engine, stage, index, run.loader)
        run.engine.destroy()
        del run
        gc.collect()
        return finished

    def _loop(self, engine, loader, stage: StageSpec, index: int, step: int, result: StageResult,
              group_names: list[str]) -> bool:
        batches = _forever(loader)
        started = time.perf_counter()
        while step < stage.steps:
            tick = time.perf_counter()
            losses, samples, tokens = [], 0, 0
            for _ in range(stage.grad_accum):
                batch = next(batches)
                out = engine(**_model_inputs(batch, self.device, self.dtype))
                engine.backward(out.loss)
                engine.step()
                losses.append(out.loss.detach().float())
                samples += int((~batch["filler"]).sum()) if "filler" in batch else batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum()) if batch["attention_mask"].dim() == 2 else 0
            step += 1
            # On the device: NCCL reduces only device tensors (gloo takes either).
            stats = torch.tensor([torch.stack(losses).mean().item(), samples, tokens, float(self.preemption.requested)],
                                 dtype=torch.float64, device=self.device)
            flags = stats[3:].clone()
            dist.all_reduce(stats[:3])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            loss = stats[0].item() / self.world_size
            result.losses.append(loss)
            elapsed = time.perf_counter() - tick
            lrs = engine.get_lr()
            record = {"stage": stage.name, "stage_index": index, "step": step, "loss": loss, "lr": lrs[0],
                      "samples_per_s": stats[1].item() / elapsed, "tokens_per_s": stats[2].item() / elapsed,
                      **{f"lr/{name}": lr for name, lr in zip(group_names, lrs)}}
            self.metrics.log(record, step)
            self.steps_this_process += 1
            if flags[0].item() > 0:
                self.save(engine, loader, stage, index, step)
                self.metrics.print(f"preempted: checkpoint at stage {stage.name} step {step} saved; exiting")
                return False
            if stage.save_every and step % stage.save_every == 0 and step < stage.steps:
                self.save(engine, loader, stage, index, step)
            if self.options.stop_after_steps is not None and self.steps_this_process >= self.options.stop_after_steps:
                return False
        result.seconds = time.perf_counter() - started
        return True

    def save(self, engine, loader, stage: StageSpec, index: int, step: int) -> Path:
        """A complete checkpoint: every rank writes its part, then rank 0 marks it complete."""
        tag = ckpt.checkpoint_tag(index, stage.name, step)
        folder = self.checkpoints / tag
        engine.save_checkpoint(str(self.checkpoints), tag=tag, client_state={"stage_index": index, "step": step},
                               save_latest=False)
        ckpt.write_rank_state(folder, self.rank, loader.state_dict())
        dist.barrier()
        if self.rank == 0:
            trainer_state = {"stage_index": index, "stage": stage.name, "step": step, "world_size": self.world_size,
                             "precision": self.precision, "model_config": self.config.to_dict(),
                             "lora": stage.lora.__dict__ if stage.train.llm == "lora" or stage.lora.roles else None}
            ckpt.mark_complete(folder, trainer_state, self.recipe.to_dict(), self.recipe.tokenizer,
                               self.image_config_json())
        dist.barrier()
        return folder

    def _finish_stage(self, engine, stage: StageSpec, index: int, loader) -> None:
        self.save(engine, loader, stage, index, stage.steps)
        save_stage_weights(engine.module, self.stage_dir(stage), self.rank, self.recipe.tokenizer,
                           self.recipe.template, self.image_config_json())
        dist.barrier()
        self.metrics.close_bar()
