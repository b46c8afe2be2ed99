"""Trainer overhead: the engine's samples/s (ZeRO-2, ZeRO-3) next to a bare DistributedDataParallel loop on the same
model and the same batches, in one run on 2 ranks, and per-rank parameter + gradient + optimizer memory.

    python bench/train_step.py [--ranks 2] [--steps 30]          (launches itself under the DeepSpeed launcher)

Target: ZeRO-2 overhead ≤ 15 % over DDP; ZeRO-3 reported. Every rank runs the same stage (vision + connector + LLM
all training, fp32 on CPU), on batches drawn once from the streaming loader and reused by every mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_ranks import add_worker_arguments, run_workers  # noqa: E402


def prepare(root: Path) -> dict[str, str]:
    """Shards (300 sample products) and a tokenizer, built once in the parent process."""
    from mmtrain.data.shards.build import build_from_catalog
    from mmtrain.data.loader.tokenizer import iter_shard_texts, train_tokenizer
    from mmtrain.data.shards.writer import BuildOptions

    lines = (REPO / "shards" / "sample" / "styles.csv").read_bytes().splitlines(keepends=True)[:301]
    (root / "styles.csv").write_bytes(b"".join(lines))
    build_from_catalog(REPO / "shards" / "catalogs" / "fashion-products.yaml", root / "styles.csv",
                       REPO / "shards" / "sample", BuildOptions(out=root / "mm", image_size=64, progress=False))
    train_tokenizer(list(iter_shard_texts(root / "mm")), 1000, root / "tok")
    return {"shards": str(root / "mm"), "tokenizer": str(root / "tok")}


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage") or t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def held_bytes(model, optimizer) -> int:
    """Bytes of unique storages behind this rank's parameters, gradients and optimizer (states + fp32 partitions)."""
    import torch

    tensors = []
    for p in model.parameters():
        tensors += [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p.data, p.grad]
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for group in inner.param_groups:
        tensors += list(group["params"]) + [p.grad for p in group["params"]]
    for name, value in vars(optimizer).items():  # ZeRO's flat fp32 partitions and gradient buffers
        if isinstance(value, (list, tuple)):
            tensors += [v for v in value if isinstance(v, torch.Tensor)]
            tensors += [w for v in value if isinstance(v, (list, tuple)) for w in v if isinstance(w, torch.Tensor)]
    return _storage_bytes(tensors)


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from mmtrain.config import recipe_from_dict
    from mmtrain.data.loader.images import ImageConfig
    from mmtrain.data.loader.config import LoaderConfig
    from mmtrain.data.loader.stream import build_loader
    from mmtrain.data.loader.tokenizer import load_tokenizer
    from mmtrain.model import VisionLanguageModel, apply_stage_policy, num_image_slots
    from mmtrain.train.dsconfig import deepspeed_config
    from mmtrain.train.runtime import init_distributed, model_inputs as _model_inputs
    from mmtrain.train.stage_model import build_stage_model, initial_state, model_config, optimizer_and_schedule

    paths = json.loads(args.paths)
    torch.set_num_threads(1)
    rank, world, device = init_distributed()
    results = {}
    for mode in ("ddp", "zero2", "zero3"):
        recipe = recipe_from_dict({"name": "bench", "tokenizer": paths["tokenizer"], "model": {"preset": "tiny"},
                                   "stages": [{"name": "s", "data": [paths["shards"]], "micro_batch": 8,
                                               "steps": args.steps, "max_length": 192,
                                               "train": {"vision": True, "connector": True, "llm": "full"},
                                               "deepspeed": str(REPO / "ds_configs" / f"{mode}.json")
                                               if mode != "ddp" else str(REPO / "ds_configs" / "zero2.json")}]})
        stage = recipe.stages[0]
        tokenizer = load_tokenizer(recipe.tokenizer)
        config = model_config(recipe, tokenizer)
        if mode == "ddp" or not hasattr(worker, "batches"):
            loader = build_loader(LoaderConfig(data=paths["shards"], num_image_slots=num_image_slots(config),
                                               batch_size=8, max_length=192, num_workers=0, mode="resampled",
                                               samples_per_epoch=10_000,
                                               image=ImageConfig(size=config.vision_config["image_size"])),
                                  tokenizer, rank, world)
            worker.batches = [b for _, b in zip(range(args.steps), loader)]
        batches = worker.batches
        state = initial_state(recipe, config)
        if mode == "ddp":
            model = VisionLanguageModel.from_config(config)
            model.load_state_dict(state)
            apply_stage_policy(model, vision=True, connector=True, llm="full")
            optimizer, _, _ = optimizer_and_schedule(model, stage)
            ddp = torch.nn.parallel.DistributedDataParallel(model)

            def step(batch):
                loss = ddp(**_model_inputs(batch, device, torch.float32)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            holder = (model, optimizer)
        else:
            ds_config = deepspeed_config(stage, world, "fp32")
            model, _ = build_stage_model(config, stage, ds_config, mode == "zero3", state, rank, 0, {})
            optimizer, scheduler, _ = optimizer_and_schedule(model, stage)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)

            def step(batch):
                loss = engine(**_model_inputs(batch, device, torch.float32)).loss
                engine.backward(loss)
                engine.step()
            holder = (engine.module, engine.optimizer)
        for batch in batches[:3]:  # warm-up: allocations, bucket set-up
            step(batch)
        dist.barrier()
        start = time.perf_counter()
        for batch in batches[3:]:
            step(batch)
        dist.barrier()
        elapsed = time.perf_counter() - start
        samples = 8 * world * (len(batches) - 3)
        memory = torch.tensor([held_bytes(*holder)], dtype=torch.float64)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        results[mode] = {"samples_per_s": samples / elapsed, "held_mb": memory.item() / 2**20}
        if mode != "ddp":
            engine.destroy()
    if rank == 0:
        Path(args.result).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = run_workers(__file__, args.ranks, ["--steps", str(args.steps)], prepare)
    ddp = results["ddp"]
    print(f"tiny preset, {args.ranks} CPU ranks (gloo, fp32), micro-batch 8 per rank, {args.steps - 3} timed steps, "
          "same batches in every mode")
    print(f"{'':24s} {'samples/s':>10s} {'× DDP':>7s} {'overhead':>9s} {'params+grads+optim MB/rank':>27s}")
    for mode, label in (("ddp", "DDP (bare loop)"), ("zero2", "mmtrain engine, ZeRO-2"), ("zero3", "mmtrain engine, ZeRO-3")):
        r = results[mode]
        overhead = ddp["samples_per_s"] / r["samples_per_s"] - 1
        verdict = f"  target ≤ 15 %: {'PASS' if overhead <= 0.15 else 'FAIL'}" if mode == "zero2" else ""
        print(f"{label:24s} {r['samples_per_s']:10.1f} {r['samples_per_s'] / ddp['samples_per_s']:7.2f} "
              f"{overhead:9.1%} {r['held_mb']:27.1f}{verdict}")


if __name__ == "__main__":
    main()
