"""The trainer: the recipe's stages in order on this rank — start-up (process group, pre-flight, tokenizer, model
config), where to start (fresh, `--start-stage`, or `--resume` from the latest complete checkpoint), then per stage:
build (stage_setup.py), step (stepping.py), save and export (saving.py), tear down.

Run as `deepspeed --num_gpus N -m mmtrain.train --recipe R.yaml --out DIR` (or under torchrun / srun: rank and world
size come from the environment). With the loader, the only part of the package that knows about ranks.
"""

from __future__ import annotations

import gc
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from mmtrain.config import Recipe
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.errors import UserError
from mmtrain.train import checkpoint as ckpt, preemption
from mmtrain.train.dsconfig import resolve_precision
from mmtrain.train.flops import peak_flops
from mmtrain.train.heartbeat import Heartbeat
from mmtrain.train.logging import metrics_logger
from mmtrain.train.recipe_change import check_resume
from mmtrain.train.run_context import RunContext, RunOptions, StageEngine, StageResult
from mmtrain.train.runtime import init_distributed
from mmtrain.train.saving import export_stage_weights, save_checkpoint
from mmtrain.train.stage_model import image_config as recipe_image_config, model_config
from mmtrain.train.stage_setup import build_stage
from mmtrain.train.stepping import run_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Runs a recipe's stages in order on this rank."""

    def __init__(self, recipe: Recipe, options: RunOptions) -> None:
        faults = recipe.faults
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        rank, world_size, device = init_distributed(faults.collective_timeout(device_type))
        heartbeat = Heartbeat(options.out, rank, world_size, faults.hang_timeout(device_type))
        precision = resolve_precision(recipe.precision, device.type)
        if not recipe.tokenizer:
            raise UserError("the recipe names no tokenizer (tokenizer: DIR)")
        if not Path(recipe.tokenizer).is_dir():
            raise UserError(f"tokenizer directory {recipe.tokenizer} does not exist (mmtrain tokenizer train ...)")
        preflight(recipe, options, rank, world_size, device)
        tokenizer = load_tokenizer(recipe.tokenizer)
        config = model_config(recipe, tokenizer)
        image_config = recipe_image_config(recipe, config)
        self.ctx = RunContext(recipe, options, rank, world_size, device, precision, DTYPES[precision],
                              peak_flops(device, precision, recipe.peak_tflops), tokenizer, config, image_config,
                              heartbeat, metrics_logger(recipe, options.out, rank, options.tensorboard))
        preemption.install()  # SIGTERM / SIGUSR1: save at the next step boundary and exit cleanly
        self.results: list[StageResult] = []

    @property
    def rank(self) -> int:
        return self.ctx.rank

    def build_engine(self, index: int, ref: ckpt.CheckpointRef | None = None) -> StageEngine:
        """Stage `index`'s engine and loader (restored from `ref`), for probes that run their own steps."""
        return build_stage(self.ctx, index, ref)

    # ---- the schedule -------------------------------------------------------------------------------------------
    def run(self) -> list[StageResult]:
        """All stages from the starting point. A failure that is not the user's (a dead peer, a collective that
        timed out) writes the hang report naming the silent ranks before it propagates (exit HANG_EXIT_CODE)."""
        ctx = self.ctx
        try:
            first, resume_ref = self._starting_point()
            for index in range(first, len(ctx.recipe.stages)):
                ref = resume_ref if resume_ref is not None and resume_ref.stage_index == index else None
                if not self._run_stage(index, ref):
                    break  # preempted or stopped: the checkpoint is written, a later --resume continues
            ctx.metrics.close()
            self._write_report()
            ctx.heartbeat.phase("barrier")
            dist.barrier()
        except UserError:
            ctx.heartbeat.close("stopped")
            raise
        except Exception as exc:
            if ctx.world_size == 1:
                raise
            ctx.heartbeat.report(f"rank {ctx.rank} failed: {type(exc).__name__}: {exc}",
                                 failure=traceback.format_exc())
            raise RankFailure(str(exc)) from exc
        ctx.heartbeat.close()
        return self.results

    def _starting_point(self) -> tuple[int, ckpt.CheckpointRef | None]:
        ctx = self.ctx
        if ctx.options.resume:
            ref = ckpt.latest_complete(ctx.checkpoints)
            if ref is not None:
                for line in check_resume(ref.path, ctx.recipe, ctx.options.allow_recipe_change):
                    ctx.metrics.print(line)
                ctx.metrics.print(f"resuming from {ref.path} (stage {ref.stage}, step {ref.step})")
                return ref.stage_index, ref
            ctx.metrics.print(f"--resume: no complete checkpoint under {ctx.checkpoints}; starting fresh")
        if ctx.options.start_stage:
            return ctx.recipe.stage_index(ctx.options.start_stage), None
        return 0, None

    def _run_stage(self, index: int, ref: ckpt.CheckpointRef | None) -> bool:
        ctx = self.ctx
        run = build_stage(ctx, index, ref)
        stage = run.stage
        result = StageResult(stage.name, run.trainable, nonfinite_steps=run.nonfinite_steps)
        self.results.append(result)
        ctx.metrics.print(f"stage {stage.name}: trainable {run.trainable}, ZeRO-{run.zero_stage}, {ctx.precision}, "
                          f"attention {run.attention}, {ctx.world_size} rank(s), "
                          f"global batch {stage.global_batch(ctx.world_size)}")
        ctx.metrics.stage_event({"stage": stage.name, "stage_index": index, "start_step": run.step,
                                 "trainable": run.trainable, "zero_stage": run.zero_stage,
                                 "precision": ctx.precision, "attention": run.attention,
                                 "compile": ctx.recipe.compile, "world_size": ctx.world_size})
        ctx.metrics.start_stage(stage.name, stage.steps, run.step)
        save = lambda r, step: save_checkpoint(ctx, r, step, result.nonfinite_steps)  # noqa: E731
        finished = run_steps(ctx, run, result, lambda: preemption.requested, save)
        if finished:
            save(run, stage.steps)
            export_stage_weights(ctx, run)
            ctx.metrics.close_bar()
        run.loader.close()  # its persistent workers: the next stage has its own loader
        run.engine.destroy()
        del run
        gc.collect()
        return finished

    def _write_report(self) -> None:
        """`OUT/run-report.json` (rank 0): per stage this process ran, the samples read and skipped (by reason)
        and the non-finite steps skipped."""
        ctx = self.ctx
        if ctx.rank != 0:
            return
        stages = [{"stage": r.name, "steps_this_run": len(r.losses), "samples_read": r.samples_read,
                   "skipped": r.skipped, "skipped_total": sum(r.skipped.values()),
                   "nonfinite_steps": r.nonfinite_steps} for r in self.results]
        ckpt.write_json_atomic(ctx.out / "run-report.json", {"recipe": ctx.recipe.name, "stages": stages})
        for r in stages:
            if r["skipped_total"] or r["nonfinite_steps"]:
                ctx.metrics.print(f"stage {r['stage']}: skipped {r['skipped_total']} of {r['samples_read']} samples "
                                  f"{r['skipped']}; non-finite steps skipped: {r['nonfinite_steps']}")


def preflight(recipe: Recipe, options: RunOptions, rank: int, world_size: int, device: torch.device) -> None:
    """`options.preflight` on the first rank of every node (free disk is per node); any failure stops all."""
    if options.preflight is None:
        return
    failed_here, table = False, ""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        failed_here, table = options.preflight(recipe, world_size, options.out, device.type)
    failed = torch.tensor([float(failed_here)], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if rank == 0 and table:
        print(table, flush=True)
    if failed.item() > 0:
        raise UserError("pre-flight checks failed (the FAIL rows above; `mmtrain doctor --recipe ...` runs them "
                        "alone)")


class RankFailure(RuntimeError):
    """This rank failed for a reason that is not the user's (a dead peer, a timed-out collective)."""
