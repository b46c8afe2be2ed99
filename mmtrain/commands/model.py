"""`mmtrain model summary --preset NAME [--gpus N]`: per-part parameter counts from configs alone, and ZeRO-3 memory."""

from __future__ import annotations

import argparse

from mmtrain.errors import UserError


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def summary(args: argparse.Namespace) -> int:
    from mmtrain.model.presets import PUBLISHED, summarize

    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    s = summarize(args.preset)
    c = s.config
    print(f"preset {s.name}: connector {c.connector}, {c.num_image_slots()} image slots per image "
          f"(vision {c.vision_config['model_type']}, llm {c.text_config['model_type']}); built on the meta device")
    print(f"{'part':<10} {'parameters':>15} {'':>10}  published")
    for part in ("vision", "connector", "llm", "total"):
        ref = PUBLISHED.get(part) if s.name != "tiny" else None
        note = f"{ref[0]} ~{_human(ref[1])} ({(s.counts[part] / ref[1] - 1) * 100:+.2f} %)" if ref else ""
        print(f"{part:<10} {s.counts[part]:>15,} {_human(s.counts[part]):>10}  {note}")
    gib = 2**30
    print(f"ZeRO-3 model states per GPU on {args.gpus} GPU(s) (DeepSpeed estimate, Adam, bf16, no offload; activations extra):")
    print(f"  everything trains:        {s.zero3_bytes_per_gpu(args.gpus) / gib:8.2f} GiB")
    print(f"  connector only (stage 1): {s.zero3_bytes_per_gpu(args.gpus, s.counts['connector']) / gib:8.2f} GiB")
    if args.stage is not None:
        _stage_memory(args, s.config)
    return 0


def _stage_memory(args: argparse.Namespace, config) -> None:
    """Per-GPU memory of one stage of a recipe (default: launch/recipes/<preset>.yaml), model states + activations."""
    import json
    from pathlib import Path

    from mmtrain.config import load_recipe
    from mmtrain.model.memory import StageShape, stage_estimate

    repo = Path(__file__).resolve().parents[2]
    recipe_path = Path(args.recipe) if args.recipe else repo / "launch" / "recipes" / f"{args.preset}.yaml"
    if not recipe_path.is_file():
        raise UserError(f"no recipe {recipe_path}: pass --recipe R.yaml for --stage")
    recipe = load_recipe(recipe_path)
    stage = recipe.stages[int(args.stage)] if str(args.stage).isdigit() else recipe.stages[
        recipe.stage_index(args.stage)]
    ds_path = Path(stage.deepspeed) if Path(stage.deepspeed).is_absolute() else repo / stage.deepspeed
    zero = json.loads(ds_path.read_text()).get("zero_optimization", {})
    shape = StageShape(gpus=args.gpus, zero_stage=int(zero.get("stage", 0)),
                       micro_batch=args.micro_batch or stage.micro_batch, seq_len=args.seq_len or stage.max_length,
                       checkpointing=recipe.checkpointing(),
                       fused_cross_entropy=args.fused_cross_entropy,
                       reduce_bucket_size=int(zero.get("reduce_bucket_size", 50_000_000)))
    estimate = stage_estimate(config, stage.train.vision, stage.train.connector, stage.train.llm, stage.lora.roles,
                              stage.lora.r, shape)
    print(f"stage {stage.name} of {recipe_path.name} on {args.gpus} GPU(s), ZeRO-{shape.zero_stage}, micro-batch "
          f"{shape.micro_batch} x {shape.seq_len} tokens, checkpointing {recipe.checkpointing()}"
          " (estimate per GPU; see mmtrain/model/memory.py):")
    print(estimate.table())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="inspect model presets")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    p = sub.add_parser("summary", help="per-part parameter counts and ZeRO-3 memory, from configs alone")
    p.add_argument("--preset", required=True, help="tiny, owl-7b, mmgpt-9b, pum-7b, llava-7b")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the ZeRO-3 per-GPU estimate (default 8)")
    p.add_argument("--stage", help="also estimate this stage's memory per GPU (name or index in the recipe)")
    p.add_argument("--recipe", help="recipe for --stage (default launch/recipes/<preset>.yaml)")
    p.add_argument("--micro-batch", type=int, help="override the stage's micro-batch")
    p.add_argument("--seq-len", type=int, help="override the stage's max_length")
    p.add_argument("--fused-cross-entropy", action="store_true", help="logits never materialised (liger-kernel)")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    p.set_defaults(func=summary)
