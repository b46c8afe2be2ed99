"""Test-only probe, started by torchrun on every "node": which samples does each rank read in one epoch?

Builds the first stage's loader exactly as the trainer does (`stage_setup.loader_config`, this rank
and world size from the launcher's environment), iterates one whole epoch and writes `OUT/rank-R.json` with the
keys of every batch, the filler flags, the samples dropped (by reason), and the node (GROUP_RANK) and local rank
the launcher gave this process. It also joins a gloo process group and all-gathers the key count, so the rendezvous
is the real one.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mmtrain.config import load_recipe
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.train.stage_model import image_config, model_config
from mmtrain.train.stage_setup import loader_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(args.recipe)
    tokenizer = load_tokenizer(recipe.tokenizer)
    config = model_config(recipe, tokenizer)
    stage = recipe.stages[0]
    image = image_config(recipe, config)
    loader = build_loader(loader_config(recipe, stage, config, image), tokenizer, rank, world_size)
    batches = [{"keys": list(b["keys"]), "filler": [bool(x) for x in b["filler"]]} for b in loader]
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([sum(len(b["keys"]) for b in batches)]))
    record = {"rank": rank, "world_size": world_size, "node": int(os.environ["GROUP_RANK"]),
              "local_rank": int(os.environ["LOCAL_RANK"]), "steps_per_epoch": len(loader), "batches": batches,
              "counts": [int(c) for c in counts], "dropped": loader.dropped()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
