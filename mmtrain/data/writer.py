"""Shard writer: WorkItems → WebDataset tar shards + manifest.json + rejects.jsonl, built aside and renamed into place.

Images are validated and re-encoded in worker processes; the parent writes tars in input order, so the same input and
seed give byte-identical shards whatever the number of workers (tar headers carry a fixed mtime, owner and mode).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from tqdm import tqdm

import mmtrain
from mmtrain.data.jpeg import DEFAULT_MAX_PIXELS, ImageRejected, reencode_image
from mmtrain.data.records import BAD_IMAGE, IMAGE_TOO_LARGE, Reject, Sample, WorkItem
from mmtrain.data.tarmember import end_of_archive, tar_member
from mmtrain.errors import UserError

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SPLITS = ("train", "val")
IMAGE_REASONS = (BAD_IMAGE, IMAGE_TOO_LARGE)  # rejected in a worker, after the reader passed the row


@dataclass
class BuildOptions:
    """Knobs of `mmtrain shards build`; every default is here."""

    out: Path
    val_fraction: float = 0.05
    seed: int = 0
    shard_size: int = 1000
    image_size: int = 448
    workers: int = 1
    max_reject_fraction: float = 0.05
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_size < 1 or self.image_size < 8 or self.workers < 1:
            raise UserError("--shard-size and --workers must be ≥ 1 and --image-size ≥ 8")


@dataclass
class BuildSummary:
    out: Path
    manifest: dict[str, Any]
    rejects: Counter = field(default_factory=Counter)
    rows: int = 0

    @property
    def reject_fraction(self) -> float:
        return sum(self.rejects.values()) / self.rows if self.rows else 0.0


def split_of(split_id: str, val_fraction: float) -> str:
    """Train or val by a hash of the product id: stable across seeds and rebuilds, never both sides for one product."""
    bucket = int.from_bytes(hashlib.sha256(split_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def _encode_item(args: tuple[WorkItem, int, int]) -> tuple[WorkItem, list[bytes] | Reject]:
    """Worker side: re-encode the item's images once, then return each sample as ready tar member bytes.

    A bad image rejects the whole item (all its samples need it).
    """
    item, image_size, max_pixels = args
    try:
        images = [reencode_image(p, image_size, max_pixels=max_pixels) for p in item.image_paths]
    except ImageRejected as exc:
        sample = item.samples[0]
        return item, Reject(item.row, sample.product_id or sample.key, exc.reason, str(exc), item.file)
    blobs = []
    for sample in item.samples:
        parts = [tar_member(f"{sample.key}.{i}.jpg", data) for i, data in enumerate(images)]
        record = json.dumps(sample.to_json(), ensure_ascii=False).encode("utf-8")
        parts.append(tar_member(f"{sample.key}.json", record))
        blobs.append(b"".join(parts))
    return item, blobs


class _ShardSink:
    """Appends one split's samples to `<split>-NNNNNN.tar`, a new shard every `shard_size` samples."""

    def __init__(self, folder: Path, split: str, shard_size: int) -> None:
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.shards: list[dict[str, Any]] = []
        self.tasks: Counter = Counter()
        self._stream: BinaryIO | None = None
        self._written = 0

    def write(self, sample: Sample, blob: bytes) -> None:
        if self._stream is None or self.shards[-1]["samples"] >= self.shard_size:
            self.close()
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._stream = open(self.folder / name, "wb")
            self.shards.append({"name": name, "samples": 0, "images": 0})
        self._stream.write(blob)
        self._written += len(blob)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["images"] += sample.num_images
        self.tasks[sample.task] += 1

    def close(self) -> None:
        if self._stream is not None:
            self._stream.write(end_of_archive(self._written))
            self._stream.close()
            self._stream, self._written = None, 0

    def summary(self) -> dict[str, Any]:
        return {"samples": sum(s["samples"] for s in self.shards), "images": sum(s["images"] for s in self.shards),
                "tasks": dict(sorted(self.tasks.items())), "shards": self.shards}


def _encoded(items: Iterable[WorkItem], options: BuildOptions) -> Iterator[tuple[WorkItem, list[bytes] | Reject]]:
    """Encode items in input order; with several workers, keep a bounded window of items in flight.

    A worker that dies raises BrokenProcessPool here instead of hanging the build (multiprocessing.Pool would wait).
    """
    jobs = ((item, options.image_size, options.max_pixels) for item in items)
    if options.workers == 1:
        yield from map(_encode_item, jobs)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    window: deque[Future] = deque()
    with ProcessPoolExecutor(options.workers, mp_context=context) as pool:
        for job in jobs:
            window.append(pool.submit(_encode_item, job))
            if len(window) >= 64 * options.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_shards(inputs: Iterable[WorkItem | Reject], options: BuildOptions, meta: dict[str, Any],
                 total: int | None = None) -> BuildSummary:
    """Write every good item's samples to shards and every reject to rejects.jsonl; return counts.

    The whole shard set is written into a hidden folder beside `options.out` and renamed into place only when
    complete, so an interrupted build leaves the previous output (or none) untouched.
    """
    out = options.out.resolve()
    if out.exists() and not options.overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rejects: list[Reject] = []
    processed = 0
    products: Counter = Counter()
    sinks = {split: _ShardSink(tmp, split, options.shard_size) for split in SPLITS}
    try:
        def good_items() -> Iterator[WorkItem]:
            for entry in inputs:
                if isinstance(entry, Reject):
                    rejects.append(entry)
                else:
                    yield entry

        bar = tqdm(total=total, unit="product", desc="shards", disable=not options.progress, dynamic_ncols=True)
        for item, result in _encoded(good_items(), options):
            processed += 1
            bar.update(1)
            if isinstance(result, Reject):
                rejects.append(result)
                continue
            split = split_of(item.split_id, options.val_fraction)
            products[split] += 1
            for sample, blob in zip(item.samples, result):
                sinks[split].write(sample, blob)
        bar.close()
        for sink in sinks.values():
            sink.close()
        # Every input row is either a reader reject or an item the workers processed (good or image reject).
        rows = processed + sum(1 for r in rejects if r.reason not in IMAGE_REASONS)
        rejects.sort(key=lambda r: (r.row if r.row is not None else -1, r.reason))
        with open(tmp / REJECTS, "w", encoding="utf-8") as fh:
            for r in rejects:
                fh.write(json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
        reject_counts = Counter(r.reason for r in rejects)
        manifest = {
            "format": "mmtrain-shards", "version": 1, "tool_version": mmtrain.__version__,
            "seed": options.seed, "val_fraction": options.val_fraction, "image_size": options.image_size,
            "shard_size": options.shard_size, "rows": rows, "rejects": dict(sorted(reject_counts.items())),
            "splits": {split: {**sinks[split].summary(), "products": products[split]} for split in SPLITS},
            **meta,
        }
        _write_json_atomic(tmp / MANIFEST, manifest)
        replace_dir(tmp, out)
    except BaseException:
        for sink in sinks.values():
            sink.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildSummary(out, manifest, reject_counts, rows)


def replace_dir(new: Path, out: Path) -> None:
    """Move a finished build into place; an existing output is swapped out first and removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if manifest.get("format") != "mmtrain-shards":
        raise UserError(f"{path} is not an mmtrain shard manifest")
    return manifest
