"""`mmtrain shards build | inspect`: argument parsing only; the work is in mmtrain.data."""

from __future__ import annotations

import argparse
import io
import warnings
from itertools import islice
from pathlib import Path

from mmtrain.commands.manifest_table import print_manifest
from mmtrain.data.loader.templates import TEMPLATE_NAMES
from mmtrain.data.shards.hf_datasets import HF_FORMAT, HFColumns
from mmtrain.data.shards.instruction_formats import FORMATS
from mmtrain.data.shards.product_tasks import TASKS
from mmtrain.errors import UserError


def parse_attribute_weights(items: list[str]) -> dict[str, float]:
    """`NAME=WEIGHT` command-line items → {name: weight}; a malformed item or a repeated name is the user's to fix."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not name or weight is None:
            raise UserError(f"--attribute-weight {item!r}: expected NAME=WEIGHT, e.g. colour=4")
        if name in out:
            raise UserError(f"--attribute-weight: {name!r} given twice")
        out[name] = weight
    return out


class DeprecatedFlag(argparse.Action):
    """An old flag name: stores into the new flag's destination, with a warning naming the new flag."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        warnings.warn(f"{option_string} is deprecated, use {new}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", help="build and inspect WebDataset shards")
    sub = shards.add_subparsers(dest="shards_command", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="catalog (or LLaVA / Alpaca / ShareGPT file) → tar shards + manifest")
    source = build.add_argument_group("source: a catalog with its spec, or an open-domain file with --format")
    source.add_argument("--spec", help="catalog spec YAML (shards/catalogs/*.yaml)")
    source.add_argument("--catalog", help="catalog file (CSV or JSONL, as the spec says)")
    source.add_argument("--format", choices=(*FORMATS, HF_FORMAT),
                        help="open-domain input format instead of a catalog (hf: Hugging Face datasets data)")
    source.add_argument("--input", nargs="+",
                        help="the open-domain JSON / JSONL file (with --format); with --format hf a save_to_disk "
                             "folder, a folder of parquet files, or parquet files")
    hf = build.add_argument_group("--format hf: which columns make a sample")
    hf.add_argument("--text-columns", nargs="+", metavar="COL",
                    help="CAPTION (with --image-column), QUESTION ANSWER, or INSTRUCTION INPUT OUTPUT")
    hf.add_argument("--conversation-column", metavar="COL", help="a LLaVA / ShareGPT turn list per row")
    hf.add_argument("--image-column", metavar="COL",
                    help="datasets.Image, image bytes, or a path relative to --images (or a list of these)")
    hf.add_argument("--id-column", metavar="COL", help="a unique id per row (default: the row number)")
    hf.add_argument("--hf-split", metavar="NAME", help="the split of a DatasetDict or parquet folder (default train)")
    build.add_argument("--images", help="folder that image paths are relative to (default: the input's folder)")
    build.add_argument("--out", required=True, help="output folder (written aside and renamed when complete), or a "
                       "URL (s3://, gs:// …: built locally, uploaded with the manifest last)")
    build.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="catalog tasks to build")
    build.add_argument("--per-task", type=int, default=1, help="samples per product and task")
    build.add_argument("--text-only", action="store_true", help="text-only variants: the product's text, no image")
    build.add_argument("--val-every-attribute", action="store_true",
                       help="held-out (val and test) products ask every attribute (attribute QA), so each "
                            "attribute is scored on all")
    build.add_argument("--attribute-weight", action="append", default=[], metavar="NAME=WEIGHT",
                       help="attribute QA asks NAME with this weight (others 1), e.g. colour=4: colour half the time "
                            "among five attributes; repeatable")
    build.add_argument("--val-fraction", type=float, default=0.05, help="share of products in the val split")
    build.add_argument("--test-fraction", type=float, default=0.0,
                       help="share of products in a test split, held out from every choice (default none)")
    build.add_argument("--seed", type=int, default=0, help="phrasing seed (same seed → byte-identical shards)")
    build.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    build.add_argument("--image-size", type=int, default=448, help="longest image side (downscale only)")
    build.add_argument("--workers", type=int, default=1, help="image re-encoding processes")
    build.add_argument("--max-reject-fraction", type=float, default=0.05,
                       help="exit non-zero when more rows than this are rejected")
    build.add_argument("--max-image-pixels", type=int, default=64_000_000,
                       help="reject images with more pixels (decompression bombs)")
    build.add_argument("--max-pixels", type=int, dest="max_image_pixels", action=DeprecatedFlag,
                       help=argparse.SUPPRESS)  # the old name of --max-image-pixels
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=run_build)

    inspect = sub.add_parser("inspect", help="print a shard set's manifest, samples, or rendered masks")
    inspect.add_argument("dir", help="shard folder (holds manifest.json)")
    inspect.add_argument("--split", default="train", help="split to read samples from")
    inspect.add_argument("--samples", type=int, default=0, help="print N decoded samples")
    inspect.add_argument("--render", type=int, default=0,
                         help="print N samples through the chat template, masked (unlearned) parts in [[...]]")
    inspect.add_argument("--tokenizer", help="tokenizer directory for --render")
    inspect.add_argument("--template", default="owl", choices=TEMPLATE_NAMES,
                         help="template for --render (chat: the tokenizer's own chat_template)")
    inspect.add_argument("--slots", type=int, default=1, help="slots per image for --render")
    inspect.set_defaults(func=run_inspect)

    from mmtrain.commands.shards_merge import add_merge_arguments, run_merge

    merge = sub.add_parser("merge", help="merge shard sets built from parts of one catalog → one manifest")
    add_merge_arguments(merge)
    merge.set_defaults(func=run_merge)


def run_build(args: argparse.Namespace) -> int:
    from mmtrain.data.shards.build import build_from_catalog, build_from_format, build_from_hf
    from mmtrain.data.shards.writer import BuildOptions

    options = BuildOptions(out=args.out, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, seed=args.seed,
                           shard_size=args.shard_size, image_size=args.image_size, workers=args.workers,
                           max_reject_fraction=args.max_reject_fraction,
                           max_image_pixels=args.max_image_pixels,
                           overwrite=args.overwrite,
                           progress=not args.no_progress)
    hf_flags = [f for f in ("text_columns", "conversation_column", "image_column", "id_column", "hf_split")
                if getattr(args, f) is not None]
    if hf_flags and args.format != HF_FORMAT:
        raise UserError(f"--{hf_flags[0].replace('_', '-')} is for --format hf")
    if args.format:
        if not args.input or args.spec or args.catalog:
            raise UserError("--format needs --input (and takes no --spec / --catalog)")
        if args.val_every_attribute or args.attribute_weight:
            raise UserError("--val-every-attribute and --attribute-weight are for catalogs (their attribute QA); "
                            "--format data has none")
        if args.format == HF_FORMAT:
            columns = HFColumns(tuple(args.text_columns or ()), args.conversation_column, args.image_column,
                                args.id_column)
            summary = build_from_hf(args.input, columns, args.images, options, args.hf_split)
        elif len(args.input) > 1:
            raise UserError(f"--format {args.format} reads one --input file, got {len(args.input)}")
        else:
            summary = build_from_format(args.format, args.input[0], args.images, options)
    else:
        if not (args.spec and args.catalog):
            raise UserError("give --spec and --catalog, or --format and --input")
        summary = build_from_catalog(args.spec, args.catalog, args.images, options, args.tasks, args.per_task,
                                     args.text_only, args.val_every_attribute,
                                     parse_attribute_weights(args.attribute_weight))
    print_manifest(summary.manifest)
    if summary.rejects:
        print(f"rejected {sum(summary.rejects.values())} of {summary.rows} rows: "
              + ", ".join(f"{reason} {n}" for reason, n in sorted(summary.rejects.items()))
              + f"  (see {summary.rejects_file})")
    if summary.reject_fraction > args.max_reject_fraction:
        raise UserError(f"{summary.reject_fraction:.1%} of rows rejected, more than --max-reject-fraction "
                        f"{args.max_reject_fraction:.1%}; the good rows are in {summary.out}, the rest in "
                        f"{summary.rejects_file}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from PIL import Image

    from mmtrain.data.loader.split_records import iter_shard_samples
    from mmtrain.data.shards.writer import read_manifest

    folder = Path(args.dir)
    print_manifest(read_manifest(folder))
    for record in islice(iter_shard_samples(folder, args.split), args.samples):
        sizes = [Image.open(io.BytesIO(b)).size for b in record["images"]]
        print(f"\n--- {record['key']}  task={record['task']}  source={record['source']}  images={sizes}")
        for turn in record["conversation"]:
            print(f"[{turn['role']}] {turn['content']}")
    if args.render:
        if not args.tokenizer:
            raise UserError("--render needs --tokenizer DIR")
        from transformers import AutoTokenizer

        from mmtrain.data.loader.templates import render_masked

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        for record in islice(iter_shard_samples(folder, args.split), args.render):
            print(f"\n--- {record['key']}  (text in [[...]] carries no label)")
            print(render_masked(tokenizer, args.template, record["conversation"], args.slots))
    return 0
