"""The trainer: `deepspeed.initialize` per stage, the two-stage schedule, complete checkpoints, exact resume.

Run as `deepspeed --num_gpus N -m mmtrain.train --recipe R.yaml --out DIR` (or under torchrun / srun: rank and world
size come from the environment). The only module besides the loader that knows about ranks.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist

from mmtrain.config import Recipe, StageSpec
from mmtrain.data.loader.bad_samples import DATA_REASONS, TEMPLATE_REASONS
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.errors import UserError
from mmtrain.model import VLMConfig, num_image_slots
from mmtrain.model.attention import resolve_attention
from mmtrain.train import checkpoint as ckpt, preemption
from mmtrain.train.dsconfig import deepspeed_config, resolve_precision, zero_stage
from mmtrain.train.export import save_stage_weights
from mmtrain.train.flops import FlopModel, batch_lengths, peak_flops, stage_flop_model
from mmtrain.train.guards import NonFiniteGuard, local_weights_finite
from mmtrain.train.heartbeat import Heartbeat
from mmtrain.train.logging import MetricsLogger
from mmtrain.train.runtime import (batch_composition, forever as _forever, init_distributed,
                                   model_inputs as _model_inputs)
from mmtrain.train.safe_load import use_safe_loading
from mmtrain.train.stage_model import (build_stage_model, initial_state, model_config, optimizer_and_schedule,
                                       stage_weights)

SKIP_REASONS = DATA_REASONS + TEMPLATE_REASONS
Preflight = Callable[[Recipe, int, Path, str], tuple[bool, str]]
"""(recipe, world size, run directory, device type) → (any check failed, the table to print)."""


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
    preflight: Preflight | None = None
    """Checks run on the first rank of every node before anything is built (the rank entry point passes
    `mmtrain.doctor.preflight`); any failure stops every rank."""


@dataclass
class StageResult:
    name: str
    trainable: dict[str, int]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_read: int = 0
    """Raw samples read from the shards by all ranks (delivered + skipped), over the whole stage."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped by all ranks, by reason, over the whole stage (a resume continues the counts)."""
    nonfinite_steps: list[int] = field(default_factory=list)


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
    nonfinite_steps: list[int] = field(default_factory=list)
    flops: FlopModel | None = None
    attention: str = "sdpa"


class _Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly.
    (`python -m mmtrain.train` installs the handlers before its imports: a signal during start-up counts too.)"""

    def __init__(self) -> None:
        preemption.install()

    @property
    def requested(self) -> bool:
        return preemption.requested


class Trainer:
    """Runs a recipe's stages in order on this rank."""

    def __init__(self, recipe: Recipe, options: RunOptions) -> None:
        self.recipe, self.options = recipe, options
        self.out = options.out
        self.faults = recipe.faults
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.rank, self.world_size, self.device = init_distributed(self.faults.collective_timeout(device_type))
        self.heartbeat = Heartbeat(self.out, self.rank, self.world_size, self.faults.hang_timeout(device_type))
        self.precision = resolve_precision(recipe.precision, self.device.type)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.peak = peak_flops(self.device, self.precision, recipe.peak_tflops)
        if not recipe.tokenizer:
            raise UserError("the recipe names no tokenizer (tokenizer: DIR)")
        if not Path(recipe.tokenizer).is_dir():
            raise UserError(f"tokenizer directory {recipe.tokenizer} does not exist (mmtrain tokenizer train ...)")
        self._preflight()
        self.tokenizer = load_tokenizer(recipe.tokenizer)
        self.config: VLMConfig = model_config(recipe, self.tokenizer)
        self.image_config = ImageConfig(**{"size": self.config.vision_config.get("image_size", 224), **recipe.image})
        self.metrics = MetricsLogger(self.out, self.rank, options.tensorboard)
        self.preemption = _Preemption()
        self.results: list[StageResult] = []
        self.steps_this_process = 0

    def _preflight(self) -> None:
        """`options.preflight` on the first rank of every node (free disk is per node); any failure stops all."""
        if self.options.preflight is None:
            return
        failed_here, table = False, ""
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            failed_here, table = self.options.preflight(self.recipe, self.world_size, self.out, self.device.type)
        failed = torch.tensor([float(failed_here)], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if self.rank == 0 and table:
            print(table, flush=True)
        if failed.item() > 0:
            raise UserError("pre-flight checks failed (the FAIL rows above; `mmtrain doctor --recipe ...` runs them "
                            "alone)")

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
        """All stages from the starting point. A failure that is not the user's (a dead peer, a collective that
        timed out) writes the hang report naming the silent ranks before it propagates (exit HANG_EXIT_CODE)."""
        try:
            first, resume_ref = self._starting_point()
            for index in range(first, len(self.recipe.stages)):
                ref = resume_ref if resume_ref is not None and resume_ref.stage_index == index else None
                if not self._run_stage(index, ref):
                    break  # preempted or stopped: the checkpoint is written, a later --resume continues
            self.metrics.close()
            self._write_report()
            self.heartbeat.phase("barrier")
            dist.barrier()
        except UserError:
            self.heartbeat.close("stopped")
            raise
        except Exception as exc:
            if self.world_size == 1:
                raise
            self.heartbeat.report(f"rank {self.rank} failed: {type(exc).__name__}: {exc}",
                                  failure=traceback.format_exc())
            raise RankFailure(str(exc)) from exc
        self.heartbeat.close()
        return self.results

    def _write_report(self) -> None:
        """`OUT/run-report.json` (rank 0): per stage this process ran, the samples read and skipped (by reason)
        and the non-finite steps skipped."""
        if self.rank != 0:
            return
        stages = [{"stage": r.name, "steps_this_run": len(r.losses), "samples_read": r.samples_read,
                   "skipped": r.skipped, "skipped_total": sum(r.skipped.values()),
                   "nonfinite_steps": r.nonfinite_steps} for r in self.results]
        ckpt.write_json_atomic(self.out / "run-report.json", {"recipe": self.recipe.name, "stages": stages})
        for r in stages:
            if r["skipped_total"] or r["nonfinite_steps"]:
                self.metrics.print(f"stage {r['stage']}: skipped {r['skipped_total']} of {r['samples_read']} samples "
                                   f"{r['skipped']}; non-finite steps skipped: {r['nonfinite_steps']}")

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
                  "pack": stage.pack, "seed": self.recipe.seed, "image": self.image_config, "num_workers": 1,
                  "on_error": "warn" if self.faults.on_bad_sample == "skip" else "raise",
                  "max_image_pixels": self.faults.max_image_pixels}
        fields.update(stage.loader)
        return build_loader(LoaderConfig(**fields), self.tokenizer, self.rank, self.world_size)

    def build_engine(self, index: int, ref: ckpt.CheckpointRef | None = None) -> "StageEngine":
        """Stage `index`'s DeepSpeed engine and loader, restored from `ref` when given. Collective."""
        stage = self.recipe.stages[index]
        self.heartbeat.phase("build", stage=stage.name, stage_index=index, step=ref.step if ref else 0)
        ds_config = deepspeed_config(stage, self.world_size, self.precision)
        zero3 = zero_stage(ds_config) == 3
        # Frozen weights are the stage's starting weights; a resumed checkpoint then restores everything that trains.
        state = self._starting_weights(index) if self.rank == 0 or not zero3 else None
        attention = resolve_attention(self.recipe.attention, self.device.type, packed=stage.pack)
        model, trainable = build_stage_model(self.config, stage, ds_config, zero3, state, self.rank,
                                             self.recipe.seed + index, self.recipe.checkpointing(),
                                             self.recipe.kernels, attention, self.recipe.compile)
        del state
        optimizer, scheduler, group_names = optimizer_and_schedule(model, stage)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        use_safe_loading(engine)
        flop_model = stage_flop_model(model, self.config, stage.train.vision, stage.train.connector, stage.train.llm)
        loader = self._loader(stage, num_image_slots(self.config))
        step, nonfinite = 0, []
        if ref is not None:
            _, client = engine.load_checkpoint(str(self.checkpoints), tag=ref.tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            loader.load_state_dict(ckpt.read_rank_state(ref.path, self.rank))
            step, nonfinite = ref.step, list((client or {}).get("nonfinite_steps", []))
        return StageEngine(engine, loader, stage, index, step, trainable, group_names, zero_stage(ds_config),
                           nonfinite, flop_model, attention)

    def _run_stage(self, index: int, ref: ckpt.CheckpointRef | None) -> bool:
        run = self.build_engine(index, ref)
        stage = run.stage
        result = StageResult(stage.name, run.trainable, nonfinite_steps=run.nonfinite_steps)
        self.results.append(result)
        self.metrics.print(f"stage {stage.name}: trainable {run.trainable}, ZeRO-{run.zero_stage}, {self.precision}, "
                           f"attention {run.attention}, {self.world_size} rank(s), global batch {stage.global_batch(self.world_size)}")
        self.metrics.stage_event({"stage": stage.name, "stage_index": index, "start_step": run.step,
                                  "trainable": run.trainable, "zero_stage": run.zero_stage,
                                  "precision": self.precision, "attention": run.attention,
                                  "compile": self.recipe.compile, "world_size": self.world_size})
        self.metrics.start_stage(stage.name, stage.steps, run.step)
        finished = self._loop(run, result)
        if finished:
            self._finish_stage(run, result)
        run.loader.close()  # its persistent workers: the next stage has its own loader
        run.engine.destroy()
        del run
        gc.collect()
        return finished

    def _loop(self, run: StageEngine, result: StageResult) -> bool:
        engine, loader, stage, index, step = run.engine, run.loader, run.stage, run.index, run.step
        batches = _forever(loader)
        guard = NonFiniteGuard(self.faults.on_nonfinite, self.faults.max_nonfinite_in_row, steps=result.nonfinite_steps,
                               total=len(result.nonfinite_steps))
        started = time.perf_counter()
        beat = self.heartbeat.phase
        while step < stage.steps:
            tick = time.perf_counter()
            losses, samples, tokens, keys, flops = [], 0, 0, [], 0.0
            skipped_before = engine.skipped_steps
            for _ in range(stage.grad_accum):
                beat("data", stage=stage.name, stage_index=index, step=step + 1)
                batch = next(batches)
                beat("forward", batch=batch_composition(batch, time.perf_counter() - tick))
                out = engine(**_model_inputs(batch, self.device, self.dtype))
                beat("backward")
                engine.backward(out.loss)  # a non-finite loss too: ZeRO's overflow check then skips the step
                beat("optimizer")
                engine.step()
                losses.append(out.loss.detach().float())
                samples += int((~batch["filler"]).sum()) if "filler" in batch else batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum()) if batch["attention_mask"].dim() == 2 else 0
                keys += list(batch.get("keys", []))
                images = 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0])
                flops += run.flops.step_flops(*batch_lengths(batch), images)
            step += 1
            counts = loader.sample_counts()
            skipped = [counts["skipped"].get(reason, 0) for reason in SKIP_REASONS]
            # On the device: NCCL reduces only device tensors (gloo takes either).
            stats = torch.tensor([torch.stack(losses).mean().item(), samples, tokens, flops, counts["read"], *skipped,
                                  float(self.preemption.requested)], dtype=torch.float64, device=self.device)
            flags = stats[-1:].clone()
            dist.all_reduce(stats[:-1])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            loss = stats[0].item() / self.world_size
            result.losses.append(loss)
            result.samples_read = int(stats[4].item())
            result.skipped = {r: int(n) for r, n in zip(SKIP_REASONS, stats[5:-1].tolist()) if n}
            grad_norm = engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            guard.check(stage.name, step, loss, grad_norm, engine.skipped_steps > skipped_before, keys, self.rank,
                        loss_scaling=self.precision == "fp16")
            elapsed = time.perf_counter() - tick
            lrs = engine.get_lr()
            record = {"stage": stage.name, "stage_index": index, "step": step, "loss": loss, "lr": lrs[0],
                      "grad_norm": grad_norm, "samples": int(stats[1].item()),
                      "samples_per_s": stats[1].item() / elapsed,
                      "tokens_per_s": stats[2].item() / elapsed, **self._throughput(stats[3].item(), elapsed),
                      "samples_read": result.samples_read,
                      "skipped": result.skipped, "nonfinite_steps": guard.total,
                      **{f"lr/{name}": lr for name, lr in zip(run.group_names, lrs)}}
            self.metrics.log(record, step)
            self._check_skip_fraction(stage, step, result)
            self.steps_this_process += 1
            if flags[0].item() > 0:
                self.save(run, step)
                self.metrics.print(f"preempted: checkpoint at stage {stage.name} step {step} saved; exiting")
                return False
            if stage.save_every and step % stage.save_every == 0 and step < stage.steps:
                self.save(run, step)
            if self.options.stop_after_steps is not None and self.steps_this_process >= self.options.stop_after_steps:
                return False
        result.seconds = time.perf_counter() - started
        return True

    def _throughput(self, flops: float, elapsed: float) -> dict[str, float | None]:
        """Model TFLOP/s per device and MFU (None where the device's peak is unknown, e.g. a CPU)."""
        per_device = flops / elapsed / self.world_size
        return {"tflops": per_device / 1e12, "mfu": per_device / self.peak if self.peak else None}

    def _check_skip_fraction(self, stage: StageSpec, step: int, result: StageResult) -> None:
        """Too many unreadable samples means bad shards, not bad luck: stop (the same decision on every rank: the
        counts are all-reduced). Template drops (too long, no label) are a max_length matter: counted, not judged.
        Measured over at least 1,000 samples so a few early skips do not stop a run."""
        bad = {r: n for r, n in result.skipped.items() if r in DATA_REASONS}
        if sum(bad.values()) > self.faults.max_skip_fraction * max(result.samples_read, 1000):
            raise UserError(f"stage {stage.name} step {step}: {sum(bad.values())} of {result.samples_read} samples "
                            f"unreadable {bad}, over faults.max_skip_fraction {self.faults.max_skip_fraction}; the "
                            "warnings above name each shard and key (rebuild or remove those shards)")

    def save(self, run: StageEngine, step: int) -> Path:
        """A complete checkpoint: every rank writes its part; only when all succeeded, and the weights are finite,
        does rank 0 mark it complete. A failed save is never marked: the run stops, the previous one stays."""
        tag = ckpt.checkpoint_tag(run.index, run.stage.name, step)
        folder = self.checkpoints / tag
        self.heartbeat.phase("save", step=step)
        if self.rank == 0:
            ckpt.clear_mark(folder)
        dist.barrier()
        error = ""
        try:
            run.engine.save_checkpoint(str(self.checkpoints), tag=tag, save_latest=False,
                                       client_state={"stage_index": run.index, "step": step,
                                                     "nonfinite_steps": list(self.results[-1].nonfinite_steps)})
            ckpt.write_rank_state(folder, self.rank, run.loader.state_dict())
        except Exception as exc:  # a full disk, a lost mount: every rank must hear of it, not wait at a barrier
            error = f"{type(exc).__name__}: {exc}"
        status = torch.zeros(2, self.world_size, dtype=torch.float64, device=self.device)
        status[0, self.rank] = float(bool(error))
        status[1, self.rank] = float(not local_weights_finite(run.engine.module))
        dist.all_reduce(status)
        failed = [r for r in range(self.world_size) if status[0, r] > 0]
        nonfinite = [r for r in range(self.world_size) if status[1, r] > 0]
        if failed or nonfinite:
            previous = ckpt.latest_complete(self.checkpoints)
            kept = f"the last complete checkpoint is {previous.path}" if previous else "no complete checkpoint exists"
            why = (f"rank(s) {failed} could not write it ({'this rank: ' + error if error else 'see their logs'})"
                   if failed else f"rank(s) {nonfinite} hold non-finite weights")
            raise UserError(f"checkpoint {folder} was not saved: {why}; {kept} (--resume starts there)")
        if self.rank == 0:
            trainer_state = {"stage_index": run.index, "stage": run.stage.name, "step": step,
                             "world_size": self.world_size, "precision": self.precision,
                             "model_config": self.config.to_dict(),
                             "lora": run.stage.lora.__dict__ if run.stage.train.llm == "lora" or run.stage.lora.roles
                             else None}
            ckpt.mark_complete(folder, trainer_state, self.recipe.to_dict(), self.recipe.tokenizer,
                               self.image_config_json())
            for removed in ckpt.prune(self.checkpoints, self.faults.keep_last):
                self.metrics.print(f"removed old checkpoint {removed} (faults.keep_last {self.faults.keep_last})")
        dist.barrier()
        return folder

    def _finish_stage(self, run: StageEngine, result: StageResult) -> None:
        self.save(run, run.stage.steps)
        save_stage_weights(run.engine.module, self.stage_dir(run.stage), self.rank, self.recipe.tokenizer,
                           self.recipe.template, self.image_config_json())
        dist.barrier()
        self.metrics.close_bar()


class RankFailure(RuntimeError):
    """This rank failed for a reason that is not the user's (a dead peer, a timed-out collective)."""
