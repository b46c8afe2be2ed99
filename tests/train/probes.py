"""Run under the DeepSpeed launcher by the tests: engine logits of a checkpoint, and ranks with unlike batches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmtrain.config import load_recipe
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.stream import build_loader
from mmtrain.model import num_image_slots
from mmtrain.train.checkpoint import latest_complete
from mmtrain.train.engine import Trainer
from mmtrain.train.run_context import RunOptions
from mmtrain.train.runtime import model_inputs


def engine_logits(args: argparse.Namespace) -> None:
    """Restore the latest checkpoint into a ZeRO-3 engine and save rank 0's first batch and its logits."""
    trainer = Trainer(load_recipe(args.recipe), RunOptions(out=Path(args.out), tensorboard=False))
    ctx = trainer.ctx
    ctx.heartbeat.close()  # this probe runs its own loop: no phases, so no watchdog
    ref = latest_complete(ctx.checkpoints)
    run = trainer.build_engine(ref.stage_index, ref)
    run.engine.eval()
    batch = next(iter(run.loader))
    inputs = model_inputs(batch, ctx.device, ctx.dtype)
    with torch.no_grad():
        logits = run.engine(**inputs).logits
    if ctx.rank == 0:
        save_file({**{k: v.contiguous() for k, v in inputs.items()}, "logits": logits.contiguous()}, args.dump)


def unlike_batches(args: argparse.Namespace) -> None:
    """Rank 0 trains on text-only batches, rank 1 on image batches, under ZeRO-3: must not hang."""
    recipe = load_recipe(args.recipe)
    trainer = Trainer(recipe, RunOptions(out=Path(args.out), tensorboard=False))
    ctx = trainer.ctx
    ctx.heartbeat.close()  # this probe runs its own loop: no phases, so no watchdog
    run = trainer.build_engine(0)
    stage = recipe.stages[0]
    data = stage.data[1].shards if ctx.rank == 0 else stage.data[0].shards
    loader = build_loader(LoaderConfig(data=data, num_image_slots=num_image_slots(ctx.config),
                                       batch_size=stage.micro_batch, max_length=stage.max_length, num_workers=0,
                                       image=ctx.image_config), ctx.tokenizer, ctx.rank,
                          ctx.world_size)
    record = []
    for _, batch in zip(range(3), loader):
        out = run.engine(**model_inputs(batch, ctx.device, ctx.dtype))
        run.engine.backward(out.loss)
        run.engine.step()
        images = 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0])
        record.append({"loss": out.loss.item(), "images": images})
    Path(args.out, f"rank-{ctx.rank}.json").write_text(json.dumps(record))
    run.engine.destroy()  # leave no communication thread running into interpreter exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["engine_logits", "unlike_batches"])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dump")
    parser.add_argument("--local_rank", type=int)
    parsed = parser.parse_args()
    {"engine_logits": engine_logits, "unlike_batches": unlike_batches}[parsed.mode](parsed)
