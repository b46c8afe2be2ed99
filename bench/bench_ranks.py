"""Shared by the benchmarks that time a real multi-rank run: the hidden worker arguments, and the launch of this
script's own worker on N ranks through mmtrain's launcher, returning rank 0's JSON result."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from mmtrain.launching import run_ranks


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags the launcher passes to each rank's copy of the script (hidden from --help)."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)


def run_workers(script: str, ranks: int, worker_args: list[str],
                prepare: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """`prepare(tmp)` builds the inputs (paths passed to every rank as JSON), then `script --worker …` runs on
    `ranks` ranks; rank 0 writes the result file this returns. A failed run prints its log's tail and exits."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp))
        result = Path(tmp) / "result.json"
        done = run_ranks(ranks, ["--worker", *worker_args, "--paths", json.dumps(paths), "--result", str(result)],
                         log=Path(tmp) / "bench.log", module=str(Path(script).resolve()))
        if done.returncode != 0:
            print((Path(tmp) / "bench.log").read_text()[-4000:])
            raise SystemExit(done.returncode)
        return json.loads(result.read_text())
