"""The optimizer steps of one stage: micro-batches through the engine, the per-step numbers all-reduced over ranks
(loss, samples, tokens, FLOPs, reads and skips, a preemption request), the non-finite guard, the metrics record,
and the periodic checkpoint. Every rank takes the same decisions from the same reduced numbers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from mmtrain.config import StageSpec
from mmtrain.data.loader.bad_samples import DATA_REASONS, TEMPLATE_REASONS
from mmtrain.errors import UserError
from mmtrain.train.flops import batch_lengths
from mmtrain.train.guards import NonFiniteGuard
from mmtrain.train.run_context import RunContext, StageEngine, StageResult
from mmtrain.train.runtime import batch_composition, forever, model_inputs

SKIP_REASONS = DATA_REASONS + TEMPLATE_REASONS


def run_steps(ctx: RunContext, run: StageEngine, result: StageResult, preempted: Callable[[], bool],
              save: Callable[[StageEngine, int], Path]) -> bool:
    """Steps from `run.step` to the stage's end. False when the stage stopped early (preempted: checkpoint saved;
    or `stop_after_steps` reached), True when it reached its last step."""
    engine, loader, stage, index, step = run.engine, run.loader, run.stage, run.index, run.step
    faults = ctx.recipe.faults
    batches = forever(loader)
    guard = NonFiniteGuard(faults.on_nonfinite, faults.max_nonfinite_in_row, steps=result.nonfinite_steps,
                           total=len(result.nonfinite_steps))
    started = time.perf_counter()
    beat = ctx.heartbeat.phase
    while step < stage.steps:
        tick = time.perf_counter()
        losses, samples, tokens, keys, flops = [], 0, 0, [], 0.0
        skipped_before = engine.skipped_steps
        for _ in range(stage.grad_accum):
            beat("data", stage=stage.name, stage_index=index, step=step + 1)
            batch = next(batches)
            beat("forward", batch=batch_composition(batch, time.perf_counter() - tick))
            out = engine(**model_inputs(batch, ctx.device, ctx.dtype))
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
                              float(preempted())], dtype=torch.float64, device=ctx.device)
        flags = stats[-1:].clone()
        dist.all_reduce(stats[:-1])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss = stats[0].item() / ctx.world_size
        result.losses.append(loss)
        result.samples_read = int(stats[4].item())
        result.skipped = {r: int(n) for r, n in zip(SKIP_REASONS, stats[5:-1].tolist()) if n}
        grad_norm = engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        guard.check(stage.name, step, loss, grad_norm, engine.skipped_steps > skipped_before, keys, ctx.rank,
                    loss_scaling=ctx.precision == "fp16")
        elapsed = time.perf_counter() - tick
        lrs = engine.get_lr()
        record = {"stage": stage.name, "stage_index": index, "step": step, "loss": loss, "lr": lrs[0],
                  "grad_norm": grad_norm, "samples": int(stats[1].item()),
                  "samples_per_s": stats[1].item() / elapsed,
                  "tokens_per_s": stats[2].item() / elapsed, **throughput(ctx, stats[3].item(), elapsed),
                  "samples_read": result.samples_read,
                  "skipped": result.skipped, "nonfinite_steps": guard.total,
                  **{f"lr/{name}": lr for name, lr in zip(run.group_names, lrs)}}
        ctx.metrics.log(record, step)
        check_skip_fraction(ctx, stage, step, result)
        ctx.steps_this_process += 1
        if flags[0].item() > 0:
            save(run, step)
            ctx.metrics.print(f"preempted: checkpoint at stage {stage.name} step {step} saved; exiting")
            return False
        if stage.save_every and step % stage.save_every == 0 and step < stage.steps:
            save(run, step)
        stop = ctx.options.stop_after_steps
        if stop is not None and ctx.steps_this_process >= stop:
            return False
    result.seconds = time.perf_counter() - started
    return True


def throughput(ctx: RunContext, flops: float, elapsed: float) -> dict[str, float | None]:
    """Model TFLOP/s per device and MFU (None where the device's peak is unknown, e.g. a CPU)."""
    per_device = flops / elapsed / ctx.world_size
    return {"tflops": per_device / 1e12, "mfu": per_device / ctx.peak if ctx.peak else None}


def check_skip_fraction(ctx: RunContext, stage: StageSpec, step: int, result: StageResult) -> None:
    """Too many unreadable samples means bad shards, not bad luck: stop (the same decision on every rank: the
    counts are all-reduced). Template drops (too long, no label) are a max_length matter: counted, not judged.
    Measured over at least 1,000 samples so a few early skips do not stop a run."""
    faults = ctx.recipe.faults
    bad = {r: n for r, n in result.skipped.items() if r in DATA_REASONS}
    if sum(bad.values()) > faults.max_skip_fraction * max(result.samples_read, 1000):
        raise UserError(f"stage {stage.name} step {step}: {sum(bad.values())} of {result.samples_read} samples "
                        f"unreadable {bad}, over faults.max_skip_fraction {faults.max_skip_fraction}; the "
                        "warnings above name each shard and key (rebuild or remove those shards)")
