"""`mmtrain report RUN_DIR`: a run's loss and lr curves per stage, per-attribute F1 bars and summary.json as files."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="PNG curves and summary.json from a run's metrics.jsonl (and eval)")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory (metrics.jsonl) or a demo directory (run/metrics.jsonl)")
    parser.add_argument("--eval", default=None, metavar="PATH",
                        help="an evaluation's metrics.json (default: RUN_DIR/eval/metrics.json when present)")
    parser.add_argument("--out", default=None, help="where the report goes (default RUN_DIR/report)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmtrain.run_report import ATTRIBUTE_CHART, find_files, write_report

    files = find_files(Path(args.run_dir), Path(args.eval) if args.eval else None,
                       Path(args.out) if args.out else None)
    if files.evaluation is None:
        print("no evaluation found (RUN_DIR/eval/metrics.json or --eval): loss and lr curves only")
    written = write_report(files)
    if files.evaluation is not None and not any(p.name == ATTRIBUTE_CHART for p in written):
        print(f"{files.evaluation} has no per-attribute F1 (model.attributes.per_attribute.NAME.f1): no bar chart")
    for path in written:
        print(path)
    return 0
