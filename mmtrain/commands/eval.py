"""`mmtrain eval`: answer a shard split's product questions with a model, score per task beside the majority
baseline (and, with --blank-images, beside the same model shown only grey images)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtrain.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="score a model on a shard split's product tasks")
    parser.add_argument("--model", required=True, help="model directory (mmtrain export, or a run's stages/NAME)")
    parser.add_argument("--shards", required=True, help="shard set directory (its train split fits the baseline)")
    parser.add_argument("--split", default="val", help="split to score (default val)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="caption category attributes attribute_qa freeform (default: all)")
    parser.add_argument("--out", default=None, help="metrics.json path; predictions.jsonl is written beside it")
    parser.add_argument("--blank-images", action="store_true",
                        help="also run the ablation with every image replaced by a constant grey one")
    parser.add_argument("--limit", type=int, default=None, help="score at most N samples (in shard order)")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (default 64)")
    parser.add_argument("--template", help="chat template (default: the one recorded with the model, else owl)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--no-loss", action="store_true", help="skip the teacher-forced answer loss")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from mmtrain.eval.baseline import majority_baseline
    from mmtrain.eval.evaluate import check_tasks, evaluate, format_table, write_results
    from mmtrain.eval.generate import load_model

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be ≥ 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be ≥ 1")
    tasks = check_tasks(args.tasks)
    loaded = load_model(args.model, args.template, args.device)
    predictions: list[dict] = []
    common = dict(split=args.split, tasks=tasks, limit=args.limit, batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens, with_loss=not args.no_loss, predictions=predictions,
                  progress=True)
    metrics = evaluate(loaded, args.shards, **common)
    blank = evaluate(loaded, args.shards, blank_images=True, **common) if args.blank_images else None
    baseline = majority_baseline(args.shards, args.split, tasks, args.limit)
    print(format_table(metrics, baseline, blank))
    if args.out:
        results = {"model": str(args.model), "shards": str(args.shards), "split": args.split,
                   "metrics": metrics, "baseline": baseline, "blank_images": blank}
        path = write_results(Path(args.out), results, predictions)
        print(f"metrics → {args.out}, predictions → {path}")
    return 0
