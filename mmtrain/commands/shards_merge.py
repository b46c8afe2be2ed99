"""`mmtrain shards merge --out DIR PART_DIR...` (wired in commands/shards.py): argument parsing only."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parts", nargs="+", metavar="PART_DIR", help="shard sets built from disjoint catalog parts")
    parser.add_argument("--out", required=True, help="merged shard set (written aside and renamed when complete)")
    parser.add_argument("--mode", choices=("link", "copy"), default="link",
                        help="hard-link the parts' tars (default; copies across filesystems) or copy them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-key-check", action="store_true",
                        help="skip reading tar headers to check that no key is in two parts (faster, unsafe)")


def run_merge(args: argparse.Namespace) -> int:
    from mmtrain.commands.manifest_table import print_manifest
    from mmtrain.data.shards.merge import merge_shard_sets

    manifest = merge_shard_sets([Path(p) for p in args.parts], Path(args.out), mode=args.mode,
                                overwrite=args.overwrite, check_keys=not args.no_key_check)
    print_manifest(manifest)
    print(f"merged {len(args.parts)} parts → {args.out}")
    return 0
