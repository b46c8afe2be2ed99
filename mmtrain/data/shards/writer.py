"""Shard writer: WorkItems → WebDataset tar shards + manifest.json + rejects.jsonl, built aside and renamed into place.

Items go in chunks to worker processes that validate and re-encode images and lay out tar members; the samples of each
split go to shards in input order, a new shard every `shard_size` samples, so the same input and seed give
byte-identical shards whatever the number of workers (tar headers carry a fixed mtime, owner and mode). With one worker
everything runs in this process; with several, each worker writes its chunk's members to a segment file and the parent
appends segments to shards with `copy_file_range`: which shard a sample lands in depends on how many good samples come
before it, known only in order, so the parent places and the workers write.
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
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from mmtrain.data import remote_files
from mmtrain.data.chunking import chunked
from mmtrain.data.shards.image_encoding import DEFAULT_MAX_PIXELS, ImageRejected, reencode_image
from mmtrain.data.shards.records import BAD_IMAGE, IMAGE_TOO_LARGE, Reject, WorkItem
from mmtrain.data.shards.tar_members import end_of_archive, padding, tar_header
from mmtrain.data.shards.upload import build_remote
from mmtrain.errors import UserError
import mmtrain

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SPLITS = ("train", "val", "test")
"""The splits a build can write; `test` only with a test_fraction (its manifest entry is absent otherwise)."""
IMAGE_REASONS = (BAD_IMAGE, IMAGE_TOO_LARGE)  # rejected in a worker, after the reader passed the row


@dataclass
class BuildOptions:
    """Knobs of `mmtrain shards build`; every default is here."""

    out: Path | str
    """The shard set's folder, or a URL (s3://, gs:// …) it is uploaded to once built (upload.py)."""
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    """Share of products held out for a final test split, never used to choose anything (the val split is)."""
    seed: int = 0
    shard_size: int = 1000
    image_size: int = 448
    workers: int = 1
    max_reject_fraction: float = 0.05
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Reject an image with more pixels (a decompression bomb), as the recipe's faults.max_image_pixels does."""
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = str(self.out) if remote_files.is_url(str(self.out)) else Path(self.out)
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 - self.val_fraction:
            raise UserError(f"--test-fraction must be in [0, 1 - val fraction), got {self.test_fraction} "
                            f"(val fraction {self.val_fraction})")
        if self.shard_size < 1 or self.image_size < 8 or self.workers < 1:
            raise UserError("--shard-size and --workers must be ≥ 1 and --image-size ≥ 8")


@dataclass
class BuildSummary:
    out: Path | str
    manifest: dict[str, Any]
    rejects: Counter = field(default_factory=Counter)
    rows: int = 0

    @property
    def rejects_file(self) -> str:
        return remote_files.join(self.out, REJECTS) if isinstance(self.out, str) else str(self.out / REJECTS)

    @property
    def reject_fraction(self) -> float:
        return sum(self.rejects.values()) / self.rows if self.rows else 0.0


def split_of(split_id: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """Train, val or test by a hash of the product id: stable across seeds and rebuilds, never two splits for one
    product. Val is the bottom of the hash range and test its top, so adding a test split leaves val as it was."""
    bucket = int.from_bytes(hashlib.sha256(split_id.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < val_fraction:
        return "val"
    return "test" if bucket >= 1.0 - test_fraction else "train"


_json = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False) without the per-call set-up


# What a worker reports per sample: the byte size of its tar members, its task and its number of images.
SampleInfo = tuple[int, str, int]


@dataclass
class _Chunk:
    """What encoding a run of consecutive inputs gave.

    `results[i]` is input i's split and one SampleInfo per sample, or its Reject. The members themselves are either in
    `parts[split]` (one list of buffers per sample, encoded in this process) or in the file `segments[split]` (written
    by a worker), the samples of each split in input order.
    """

    results: list[tuple[str, list[SampleInfo]] | Reject]
    parts: dict[str, list[list[Any]]] = field(default_factory=dict)
    segments: dict[str, str] = field(default_factory=dict)


def _encode_chunk(entries: list[Any], expand: Callable[[Any], WorkItem] | None, image_size: int, max_pixels: int,
                  val_fraction: float, test_fraction: float, segment: str | None) -> _Chunk:
    """Turn each entry into its WorkItem (`expand`, e.g. a product → its task samples), validate and re-encode its
    images once, and lay out its samples as tar members.

    A bad image rejects the whole item (all its samples need it). Each image is referenced by every sample that shows
    it, not copied: the buffers go to `os.writev` as they are. With `segment`, the members of each split are written
    to `<segment>.<split>` here (a build worker) and only sizes travel back to the parent.
    """
    results: list[tuple[str, list[SampleInfo]] | Reject] = []
    parts: dict[str, list[list[Any]]] = {split: [] for split in SPLITS}
    for entry in entries:
        item: WorkItem = expand(entry) if expand is not None else entry
        try:
            images = [reencode_image(p, image_size, max_pixels=max_pixels) for p in item.image_paths]
        except ImageRejected as exc:
            first = item.samples[0] if item.samples else None
            who = (first.product_id or first.key) if first is not None else item.split_id
            results.append(Reject(item.row, who, exc.reason, str(exc), item.file))
            continue
        split = split_of(item.split_id, val_fraction, test_fraction)
        pads = [padding(len(data)) for data in images]
        infos = []
        for sample in item.samples:
            members: list[Any] = []
            for i, data in enumerate(images):
                members += (tar_header(f"{sample.key}.{i}.jpg", len(data)), data, pads[i])
            record = _json(sample.to_json()).encode("utf-8")
            members += (tar_header(f"{sample.key}.json", len(record)), record, padding(len(record)))
            parts[split].append(members)
            infos.append((sum(map(len, members)), sample.task, sample.num_images))
        results.append((split, infos))
    chunk = _Chunk(results)
    if segment is None:
        chunk.parts = parts
        return chunk
    for split, samples in parts.items():
        if samples:
            path = f"{segment}.{split}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _writev(fd, [buf for members in samples for buf in members])
            finally:
                os.close(fd)
            chunk.segments[split] = path
    return chunk


_IOV_BATCH = 512  # below every platform's IOV_MAX


def _writev(fd: int, buffers: list[Any]) -> None:
    """Write all `buffers` in order with as few system calls as the kernel allows (writev may write less)."""
    for start in range(0, len(buffers), _IOV_BATCH):
        batch = buffers[start:start + _IOV_BATCH]
        left = sum(map(len, batch)) - os.writev(fd, batch)
        if left:  # a short write: rare on regular files; finish it plainly
            rest = memoryview(b"".join(batch))[-left:]
            while rest:
                rest = rest[os.write(fd, rest):]


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append `count` bytes of `src` from `offset` to `dst`, in the kernel where it can (no copy through Python)."""
    copy = getattr(os, "copy_file_range", None)
    while count:
        done = 0
        if copy is not None:
            try:
                done = copy(src, dst, count, offset)
            except OSError:
                copy = None  # a file system or kernel without it: fall back for the rest
        if not done:
            data = os.pread(src, min(count, 1 << 20), offset)
            if not data:
                raise OSError(f"segment ended {count} bytes early")
            _writev(dst, [data])
            done = len(data)
        offset += done
        count -= done


class _ShardSink:
    """Appends one split's samples to `<split>-NNNNNN.tar`, a new shard every `shard_size` samples."""

    def __init__(self, folder: Path, split: str, shard_size: int) -> None:
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.shards: list[dict[str, Any]] = []
        self.tasks: Counter = Counter()
        self._fd: int | None = None
        self._written = 0

    def write(self, infos: list[SampleInfo], parts: list[list[Any]] | None = None, segment: int | None = None) -> None:
        """Append samples whose members are `parts` (buffers per sample) or, back to back, the file `segment`."""
        start, offset = 0, 0
        while start < len(infos):
            if self._fd is None or self.shards[-1]["samples"] >= self.shard_size:
                self.close()
                name = f"{self.split}-{len(self.shards):06d}.tar"
                self._fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                self.shards.append({"name": name, "samples": 0, "images": 0})
            stop = min(len(infos), start + self.shard_size - self.shards[-1]["samples"])
            count = 0
            shard = self.shards[-1]
            for size, task, images in infos[start:stop]:
                count += size
                shard["images"] += images
                self.tasks[task] += 1
            shard["samples"] += stop - start
            if parts is not None:
                _writev(self._fd, [buf for members in parts[start:stop] for buf in members])
            else:
                _copy_range(segment, self._fd, offset, count)
            offset += count
            self._written += count
            start = stop

    def close(self) -> None:
        if self._fd is not None:
            try:
                _writev(self._fd, [end_of_archive(self._written)])
            finally:
                os.close(self._fd)
                self._fd, self._written = None, 0

    def abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def summary(self) -> dict[str, Any]:
        return {"samples": sum(s["samples"] for s in self.shards), "images": sum(s["images"] for s in self.shards),
                "tasks": dict(sorted(self.tasks.items())), "shards": self.shards}


CHUNK_ITEMS = 32  # inputs per worker task: few enough to keep every worker busy, many enough to amortize the IPC


def _encoded(entries: Iterable[Any], expand: Callable[[Any], WorkItem] | None, options: BuildOptions,
             folder: Path) -> Iterator[tuple[int, _Chunk]]:
    """(number of inputs, encoded chunk) in input order; with several workers, a bounded window of chunks in flight.

    Workers write each chunk's members to segment files in `folder` and return only sizes, so the parent moves no
    image bytes through a pipe or through Python: it appends segments to shards in the kernel (`copy_file_range`).
    A worker that dies raises BrokenProcessPool here instead of hanging the build (multiprocessing.Pool would wait).
    """
    args = (expand, options.image_size, options.max_image_pixels, options.val_fraction, options.test_fraction)
    if options.workers == 1:
        for chunk in chunked(entries, CHUNK_ITEMS):
            yield len(chunk), _encode_chunk(chunk, *args, None)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    window: deque[tuple[int, Future]] = deque()
    pool = ProcessPoolExecutor(options.workers, mp_context=context)
    try:
        for n, chunk in enumerate(chunked(entries, CHUNK_ITEMS)):
            window.append((len(chunk), pool.submit(_encode_chunk, chunk, *args, str(folder / f".chunk-{n:09d}"))))
            if len(window) >= 4 * options.workers:
                count, future = window.popleft()
                yield count, future.result()
        while window:
            count, future = window.popleft()
            yield count, future.result()
    finally:  # also on an interrupt: no worker may still write into the folder when it is removed
        pool.shutdown(wait=True, cancel_futures=True)


def _write_chunk(chunk: _Chunk, sinks: dict[str, _ShardSink], products: Counter, rejects: list[Reject]) -> None:
    """Append one encoded chunk to the split sinks, in input order; a chunk's segment files go once copied."""
    by_split: dict[str, list[SampleInfo]] = {split: [] for split in SPLITS}
    for result in chunk.results:
        if isinstance(result, Reject):
            rejects.append(result)
            continue
        split, infos = result
        products[split] += 1
        by_split[split] += infos
    for split, infos in by_split.items():
        if not infos:
            continue
        if split in chunk.parts:
            sinks[split].write(infos, parts=chunk.parts[split])
            continue
        fd = os.open(chunk.segments[split], os.O_RDONLY)
        try:
            sinks[split].write(infos, segment=fd)
        finally:
            os.close(fd)
            os.unlink(chunk.segments[split])


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_shards(inputs: Iterable[Any], options: BuildOptions, meta: dict[str, Any], total: int | None = None,
                 expand: Callable[[Any], WorkItem] | None = None) -> BuildSummary:
    """Write every good item's samples to shards and every reject to rejects.jsonl; return counts.

    `inputs` are WorkItems and Rejects, or, with `expand` (a picklable function run in the workers), whatever `expand`
    turns into a WorkItem: the catalog build sends products and lets the workers draw their task samples.

    The whole shard set is written into a hidden folder beside `options.out` and renamed into place only when
    complete, so an interrupted build leaves the previous output (or none) untouched.
    """
    if isinstance(options.out, str):  # a URL: built into a scratch folder, then uploaded, manifest last
        return build_remote(options, lambda local: build_shards(inputs, local, meta, total, expand))
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
        def good_items() -> Iterator[Any]:
            for entry in inputs:
                if isinstance(entry, Reject):
                    rejects.append(entry)
                else:
                    yield entry

        bar = tqdm(total=total, unit="product", desc="shards", disable=not options.progress, dynamic_ncols=True)
        encoded = _encoded(good_items(), expand, options, tmp)
        try:
            for count, chunk in encoded:
                processed += count
                bar.update(count)
                _write_chunk(chunk, sinks, products, rejects)
        finally:
            encoded.close()  # stops the workers before anything below (or the clean-up) touches the folder
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
        written_splits = SPLITS if options.test_fraction else SPLITS[:2]
        test_fraction = {"test_fraction": options.test_fraction} if options.test_fraction else {}  # as before without
        manifest = {
            "format": "mmtrain-shards", "version": 1, "tool_version": mmtrain.__version__,
            "seed": options.seed, "val_fraction": options.val_fraction, **test_fraction,
            "image_size": options.image_size,
            "shard_size": options.shard_size, "rows": rows, "rejects": dict(sorted(reject_counts.items())),
            "splits": {split: {**sinks[split].summary(), "products": products[split]} for split in written_splits},
            **meta,
        }
        _write_json_atomic(tmp / MANIFEST, manifest)
        replace_dir(tmp, out)
    except BaseException:
        for sink in sinks.values():
            sink.abandon()
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
