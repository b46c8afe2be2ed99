"""`mmtrain tokenizer train`: a small sentencepiece tokenizer trained on a shard set, saved as a HF directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtrain.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="tokenizer tools")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = sub.add_parser("train", help="train a sentencepiece tokenizer on a shard set's text")
    train.add_argument("--shards", required=True, help="shard set directory (holds manifest.json)")
    train.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
    train.add_argument("--split", default="train", help="split whose text is used (default train)")
    train.add_argument("--out", required=True, help="output HF tokenizer directory")
    train.set_defaults(func=run_train)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_train(args: argparse.Namespace) -> int:
    from mmtrain.data.loader.tokenizer import iter_shard_texts, load_tokenizer, train_tokenizer

    shards = Path(args.shards)
    if not (shards / "manifest.json").is_file():
        raise UserError(f"{shards}: no manifest.json (not a shard set)")
    if args.vocab_size < 300:
        raise UserError(f"--vocab-size {args.vocab_size} too small (byte fallback needs at least 300)")
    try:
        out = train_tokenizer(iter_shard_texts(shards, args.split), args.vocab_size, args.out)
    except KeyError as exc:
        raise UserError(f"{shards}: manifest has no split {exc}") from None
    except ValueError as exc:
        raise UserError(f"{shards}: {exc}") from None
    tok = load_tokenizer(out)
    print(f"tokenizer: {len(tok)} tokens → {out}")
    return 0
