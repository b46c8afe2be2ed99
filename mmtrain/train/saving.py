"""Complete checkpoints: every rank writes its part, and only when all succeeded and the weights are finite does
rank 0 mark the folder complete (a failed save is never marked: the run stops, the previous checkpoint stays). At a
stage's end the stage's weights are exported beside them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mmtrain.errors import UserError
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.export import save_stage_weights
from mmtrain.train.guards import local_weights_finite
from mmtrain.train.run_context import RunContext, StageEngine


def save_checkpoint(ctx: RunContext, run: StageEngine, step: int, nonfinite_steps: list[int]) -> Path:
    """Stage `run` at `step` as a complete checkpoint under `ctx.checkpoints`. Collective."""
    tag = ckpt.checkpoint_tag(run.index, run.stage.name, step)
    folder = ctx.checkpoints / tag
    ctx.heartbeat.phase("save", step=step)
    if ctx.rank == 0:
        ckpt.clear_mark(folder)
    dist.barrier()
    error = ""
    try:
        run.engine.save_checkpoint(str(ctx.checkpoints), tag=tag, save_latest=False,
                                   client_state={"stage_index": run.index, "step": step,
                                                 "nonfinite_steps": list(nonfinite_steps)})
        ckpt.write_rank_state(folder, ctx.rank, run.loader.state_dict())
    except Exception as exc:  # a full disk, a lost mount: every rank must hear of it, not wait at a barrier
        error = f"{type(exc).__name__}: {exc}"
    status = torch.zeros(2, ctx.world_size, dtype=torch.float64, device=ctx.device)
    status[0, ctx.rank] = float(bool(error))
    status[1, ctx.rank] = float(not local_weights_finite(run.engine.module))
    dist.all_reduce(status)
    failed = [r for r in range(ctx.world_size) if status[0, r] > 0]
    nonfinite = [r for r in range(ctx.world_size) if status[1, r] > 0]
    if failed or nonfinite:
        previous = ckpt.latest_complete(ctx.checkpoints)
        kept = f"the last complete checkpoint is {previous.path}" if previous else "no complete checkpoint exists"
        why = (f"rank(s) {failed} could not write it ({'this rank: ' + error if error else 'see their logs'})"
               if failed else f"rank(s) {nonfinite} hold non-finite weights")
        raise UserError(f"checkpoint {folder} was not saved: {why}; {kept} (--resume starts there)")
    if ctx.rank == 0:
        stage = run.stage
        trainer_state = {"stage_index": run.index, "stage": stage.name, "step": step,
                         "world_size": ctx.world_size, "precision": ctx.precision,
                         "model_config": ctx.config.to_dict(),
                         "lora": stage.lora.__dict__ if stage.train.llm == "lora" or stage.lora.roles else None}
        ckpt.mark_complete(folder, trainer_state, ctx.recipe.to_dict(), ctx.recipe.tokenizer, ctx.image_config_json())
        keep = ctx.recipe.faults.keep_last
        for removed in ckpt.prune(ctx.checkpoints, keep):
            ctx.metrics.print(f"removed old checkpoint {removed} (faults.keep_last {keep})")
    dist.barrier()
    return folder


def export_stage_weights(ctx: RunContext, run: StageEngine) -> None:
    """The finished stage's weights under `stages/<name>` (what the next stage and `mmtrain export` start from)."""
    save_stage_weights(run.engine.module, ctx.stage_dir(run.stage), ctx.rank, ctx.recipe.tokenizer,
                       ctx.recipe.template, ctx.image_config_json())
    dist.barrier()
