"""`mmtrain train` (one rank per process, under deepspeed / torchrun / srun) and `mmtrain export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtrain.train.entry import add_train_arguments, run_train


def run_export(args: argparse.Namespace) -> int:
    from mmtrain.train.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out), merge=args.merge_lora)
    print(f"exported {args.checkpoint} → {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="run a recipe on this rank (start with deepspeed / torchrun / srun)")
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    export = subparsers.add_parser("export", help="checkpoint → HF directory (+ peft adapter)")
    export.add_argument("--checkpoint", required=True, help="a complete checkpoint folder (OUT/checkpoints/TAG)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--merge-lora", action="store_true", help="fold LoRA into the base weights")
    export.set_defaults(func=run_export)
