"""Data checks: every stage's shard sets are readable, and there are enough shards for ranks × loader workers.

A shard set named by URL (`s3://`, `gs://`, `https://` …) is checked as the loader will read it, with the stage's
`shard_*` fetch options: its manifest is read, and each shard's size comes from the file system's `info` (one
metadata request per shard, in parallel, retried like the loader's fetches), never its bytes."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from mmtrain.data import remote_files
from mmtrain.data.remote_files import FetchError, FetchOptions
from mmtrain.doctor.context import Context, Unavailable, fetch_options, num_workers, stage_label
from mmtrain.doctor.report import Check, row

PARALLEL_INFO = 16
"""Size requests in flight at once for a shard set named by URL (thousands of shards, one request each)."""


def _sources(ctx: Context) -> Iterator[tuple[str, str | list[str], FetchOptions]]:
    """(stage label, shards spec, the stage's fetch options) of every data source of every stage."""
    for stage in ctx.recipe.stages:
        for source in stage.data:
            yield stage_label(stage), source.shards, fetch_options(stage)


def shard_size(path: str, fetch: FetchOptions) -> int | None:
    """Bytes of one shard: `os.stat` for a file, the fsspec file system's `info` for a URL (retried as the loader's
    fetches are; None when the server states no size). Raises OSError (FetchError for a URL) when it cannot."""
    if not remote_files.is_url(path):
        return os.stat(path).st_size
    fs, inner = remote_files.filesystem(path, fetch)
    size = remote_files.retrying(path, lambda: fs.info(inner).get("size"), fetch)
    return None if size is None else int(size)


def _sizes(paths: list[str], fetch: FetchOptions) -> list[int | None | OSError]:
    """`shard_size` of each path, or the OSError that says why not. URLs after the first go PARALLEL_INFO at a
    time: the first, asked alone, opens the file system's session that the others then share."""
    def size(path: str) -> int | None | OSError:
        try:
            return shard_size(path, fetch)
        except OSError as exc:
            return exc
    if len(paths) < 2 or not any(remote_files.is_url(p) for p in paths):
        return [size(p) for p in paths]
    first = size(paths[0])
    with ThreadPoolExecutor(min(PARALLEL_INFO, len(paths) - 1)) as pool:
        return [first] + list(pool.map(size, paths[1:]))


def _unreadable(path: str, exc: OSError) -> str:
    """Why a shard cannot be read, naming its path or URL: missing (a file not there, a URL answered 'not found'),
    else unreachable, with the fetch's last failure after its retries."""
    if isinstance(exc, FetchError):
        gone = isinstance(exc.cause, FileNotFoundError) and not remote_files.is_transient(exc.cause)
        if not gone:
            return f"{path} is unreachable: {exc.detail}"
    return f"{path} is missing"


def check_shards(ctx: Context) -> Check:
    """Manifest parses (the loader's own reader), the train split lists shards, each file exists and is not empty.
    Why here: a missing shard otherwise fails a worker mid-epoch, possibly in a later stage hours in."""
    problems: list[tuple[str, str]] = []
    files = samples = 0
    seen: set[str] = set()
    for where, spec, fetch in _sources(ctx):
        try:
            shards = ctx.shards(spec, fetch)
        except Unavailable as exc:
            problems.append(("FAIL", f"{where}: {exc}"))
            continue
        if str(spec) in seen:
            continue
        seen.add(str(spec))
        bad, cut = [], []
        for shard, size in zip(shards, _sizes([s.path for s in shards], fetch)):
            if isinstance(size, OSError):
                bad.append(_unreadable(shard.path, size))
            elif size == 0:
                bad.append(f"{shard.path} is empty")
            elif size is not None and size % 512:
                cut.append(f"{shard.path} is truncated ({size} bytes, not whole tar blocks)")
        if bad:
            more = f" (+{len(bad) - 2} more)" if len(bad) > 2 else ""
            problems.append(("FAIL", f"{where}: {spec}: {'; '.join(bad[:2])}{more}; rebuild or re-copy the shard set"))
        if cut:  # the loader skips (and counts) the samples a cut shard lost, unless told to raise on bad samples
            status = "FAIL" if ctx.recipe.faults.on_bad_sample == "raise" else "WARN"
            more = f" (+{len(cut) - 2} more)" if len(cut) > 2 else ""
            problems.append((status, f"{where}: {spec}: {'; '.join(cut[:2])}{more}; its lost samples will be skipped "
                                     "and counted (rebuild or re-copy the shard set)"))
        files += len(shards)
        samples += sum(s.samples for s in shards)
    return row("shards", problems, f"{len(seen)} shard set(s), {files} train shard(s), {samples} samples, all readable")


def check_shard_count(ctx: Context) -> Check:
    """Shards ≥ slots (ranks × loader workers) per source, else slots share shards (see docs/loader.md)."""
    short: dict[str, list[str]] = {"exact": [], "resampled": []}
    lowest = None
    for stage in ctx.recipe.stages:
        slots = ctx.world_size * num_workers(stage)
        for source in stage.data:
            try:
                count = len(ctx.shards(source.shards, fetch_options(stage)))
            except Unavailable:
                continue  # reported by the shards row
            lowest = count if lowest is None else min(lowest, count)
            if count < slots:
                mode = stage.loader.mode
                short[mode].append(f"{stage_label(stage)} {source.shards} has {count} shards for {slots} slots "
                                   f"({ctx.world_size} rank(s) × {num_workers(stage)} worker(s))")
    problems = []
    if short["exact"]:
        problems.append(("WARN", f"{'; '.join(short['exact'])}: slots split the samples, cutting shards, so each "
                                 f"slot reads a slice of a shard (indexing the whole shard's headers to seek in), "
                                 f"several slots read the same file and a slot's shuffle only mixes its slice"))
    if short["resampled"]:
        problems.append(("WARN", f"{'; '.join(short['resampled'])}: each slot draws whole shards with replacement, "
                                 f"so slots read the same few shards and a global batch holds many samples of one "
                                 f"shard"))
    if problems:
        problems.append(("WARN", "rebuild with a smaller `mmtrain shards build --shard-size` for at least one shard "
                                 "per slot"))
    return row("shard count", problems, f"every source has ≥ ranks × workers shards (fewest: {lowest})")
