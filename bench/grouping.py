"""Grouped batches (`group_by: modality_length`) against random ones (`group_by: none`) on the same shard set, side
by side in one run on 2 CPU ranks: padding fraction, batch make-up and ZeRO-2 engine step time (tiny preset).

    python bench/grouping.py [--ranks 2] [--windows 2] [--rounds 5]     (launches itself under the DeepSpeed launcher)

The data is a mixture of the catalog's image samples and its text-only samples (weights 0.7 / 0.3, as in LLaVA-style
instruction data that mixes both). Each rank draws `windows` × `group_window` batches in each mode: whole windows,
so both modes hold exactly the same samples on every rank, only grouped differently. One engine times every batch
of both modes, alternating which goes first, over `rounds` rounds after one warm-up round (the VM's speed drifts):
the figures are the median round and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_ranks import add_worker_arguments, run_workers  # noqa: E402
MODES = ("none", "modality_length")
MICRO_BATCH = 8
MAX_LENGTH = 256


def prepare(root: Path) -> dict[str, str]:
    """Image and text-only shard sets from the first 300 sample products, and a tokenizer, built once."""
    from mmtrain.data.shards.build import build_from_catalog
    from mmtrain.data.loader.tokenizer import iter_shard_texts, train_tokenizer
    from mmtrain.data.shards.writer import BuildOptions

    lines = (REPO / "shards" / "sample" / "styles.csv").read_bytes().splitlines(keepends=True)[:301]
    (root / "styles.csv").write_bytes(b"".join(lines))
    for kind in ("mm", "text"):
        build_from_catalog(REPO / "shards" / "catalogs" / "fashion-products.yaml", root / "styles.csv",
                           REPO / "shards" / "sample", BuildOptions(out=root / kind, image_size=64, progress=False),
                           text_only=kind == "text")
    train_tokenizer(list(iter_shard_texts(root / "mm")) + list(iter_shard_texts(root / "text")), 1000, root / "tok")
    return {"mm": str(root / "mm"), "text": str(root / "text"), "tokenizer": str(root / "tok")}


def draw(paths: dict, group_by: str, batches: int, slots: int, image_size: int, tokenizer, rank: int, world: int):
    """The first `batches` batches of this rank in one mode, and their figures."""
    from mmtrain.data.loader.collate import padding_waste
    from mmtrain.data.loader.images import ImageConfig
    from mmtrain.data.loader.config import LoaderConfig
    from mmtrain.data.loader.stream import build_loader

    cfg = LoaderConfig(data=[{"shards": paths["mm"], "weight": 0.7}, {"shards": paths["text"], "weight": 0.3}],
                       num_image_slots=slots, batch_size=MICRO_BATCH, max_length=MAX_LENGTH, num_workers=0,
                       samples_per_epoch=MICRO_BATCH * batches * world, group_by=group_by,
                       image=ImageConfig(size=image_size))
    loader = build_loader(cfg, tokenizer, rank, world)
    out = list(loader)
    assert len(out) == batches, (len(out), batches)
    pad, total = map(sum, zip(*(padding_waste(b) for b in out)))
    kinds = [len(set(b["image_slots"][:, 0].tolist())) for b in out]
    figures = {"pad": pad, "tokens": total, "mixed": sum(0 < k < MICRO_BATCH for k in kinds),
               "text": sum(k == 0 for k in kinds), "images": sum(k == MICRO_BATCH for k in kinds),
               "keys": sorted(k for b in out for k in b["keys"])}
    return out, figures


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from mmtrain.config import recipe_from_dict
    from mmtrain.data.loader.grouping import WINDOW
    from mmtrain.data.loader.tokenizer import load_tokenizer
    from mmtrain.model import num_image_slots
    from mmtrain.train.dsconfig import deepspeed_config
    from mmtrain.train.runtime import init_distributed
    from mmtrain.train.runtime import model_inputs as _model_inputs
    from mmtrain.train.stage_model import build_stage_model, initial_state, model_config, optimizer_and_schedule

    paths = json.loads(args.paths)
    torch.set_num_threads(1)
    rank, world, device = init_distributed()
    batches = args.windows * WINDOW
    recipe = recipe_from_dict({"name": "bench", "tokenizer": paths["tokenizer"], "model": {"preset": "tiny"},
                               "stages": [{"name": "s", "data": [paths["mm"]], "micro_batch": MICRO_BATCH,
                                           "steps": batches, "max_length": MAX_LENGTH,
                                           "train": {"vision": True, "connector": True, "llm": "full"},
                                           "deepspeed": str(REPO / "ds_configs" / "zero2.json")}]})
    stage = recipe.stages[0]
    tokenizer = load_tokenizer(recipe.tokenizer)
    config = model_config(recipe, tokenizer)
    drawn = {mode: draw(paths, mode, batches, num_image_slots(config), config.vision_config["image_size"], tokenizer,
                        rank, world) for mode in MODES}
    assert drawn["none"][1]["keys"] == drawn["modality_length"][1]["keys"]  # whole windows: the same samples
    ds_config = deepspeed_config(stage, world, "fp32")
    model, _ = build_stage_model(config, stage, ds_config, False, initial_state(recipe, config), rank, 0, {})
    optimizer, scheduler, _ = optimizer_and_schedule(model, stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    def step(batch) -> None:
        loss = engine(**_model_inputs(batch, device, torch.float32)).loss
        engine.backward(loss)
        engine.step()

    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(args.rounds + 1):  # round 0 warms up: allocations, bucket set-up, both kinds of batch
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in drawn[mode][0]:
                step(batch)
            used = torch.tensor([time.process_time() - start_cpu], dtype=torch.float64)
            dist.all_reduce(used)  # CPU of all ranks: less sensitive than the wall clock to other load on the VM
            dist.barrier()
            if r:
                seconds[mode].append(time.perf_counter() - start)
                cpu[mode].append(used.item() / world)
    figures = {}
    for mode in MODES:
        f = drawn[mode][1]
        counts = torch.tensor([f["pad"], f["tokens"], f["mixed"], f["text"], f["images"]], dtype=torch.float64)
        dist.all_reduce(counts)
        pad, tokens, mixed, text, images = counts.tolist()
        figures[mode] = {"pad": pad / tokens, "tokens": tokens, "mixed": mixed, "text": text, "images": images,
                         "step_s": statistics.median(seconds[mode]) / batches, "rounds": seconds[mode],
                         "cpu_s": statistics.median(cpu[mode]) / batches}
    engine.destroy()
    if rank == 0:
        Path(args.result).write_text(json.dumps({"batches": batches, "figures": figures}))


def report(result: dict, ranks: int, rounds: int) -> None:
    none, grouped = (result["figures"][m] for m in MODES)
    n = result["batches"] * ranks
    print(f"tiny preset, ZeRO-2, {ranks} CPU ranks (gloo, fp32), micro-batch {MICRO_BATCH}, max_length {MAX_LENGTH}; "
          f"{result['batches']} batches per rank per mode (whole windows: the same samples in both), "
          f"mixture image 0.7 / text-only 0.3, median of {rounds} rounds")
    print(f"{'':34s} {'group_by: none':>15s} {'modality_length':>16s} {'ratio':>7s}")
    rows = [("padding (pad / all tokens)", f"{none['pad']:.1%}", f"{grouped['pad']:.1%}", grouped["pad"] / none["pad"]),
            ("tokens per step, padded", f"{none['tokens'] / n:.0f}", f"{grouped['tokens'] / n:.0f}",
             grouped["tokens"] / none["tokens"]),
            ("batches: mixed / image / text", f"{none['mixed']:.0f} / {none['images']:.0f} / {none['text']:.0f}",
             f"{grouped['mixed']:.0f} / {grouped['images']:.0f} / {grouped['text']:.0f}", None),
            ("step time, ms", f"{1000 * none['step_s']:.1f}", f"{1000 * grouped['step_s']:.1f}",
             grouped["step_s"] / none["step_s"]),
            ("CPU per step and rank, ms", f"{1000 * none['cpu_s']:.1f}", f"{1000 * grouped['cpu_s']:.1f}",
             grouped["cpu_s"] / none["cpu_s"])]
    for label, a, b, ratio in rows:
        print(f"{label:34s} {a:>15s} {b:>16s} {'' if ratio is None else f'{ratio:7.2f}'}")
    for mode in MODES:
        per_step = ", ".join(f"{1000 * s / result['batches']:.1f}" for s in result["figures"][mode]["rounds"])
        print(f"  step time per round, {mode}: {per_step} ms")
    paired = [g / n for g, n in zip(grouped["rounds"], none["rounds"])]
    print(f"  step time grouped / none, paired per round: median {statistics.median(paired):.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in paired)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2, help="grouping windows of batches drawn per rank")
    parser.add_argument("--rounds", type=int, default=5)
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    result = run_workers(__file__, args.ranks, ["--windows", str(args.windows), "--rounds", str(args.rounds)], prepare)
    report(result, args.ranks, args.rounds)


if __name__ == "__main__":
    main()
