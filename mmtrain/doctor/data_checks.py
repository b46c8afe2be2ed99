"""Data checks: every stage's shard sets are readable, and there are enough shards for ranks × loader workers."""

from __future__ import annotations

import os
from typing import Iterator

from mmtrain.doctor.context import Context, Unavailable, num_workers, stage_label
from mmtrain.doctor.report import Check, row


def _sources(ctx: Context) -> Iterator[tuple[str, str | list[str]]]:
    """(stage label, shards spec) of every data source of every stage."""
    for stage in ctx.recipe.stages:
        for source in stage.data:
            yield stage_label(stage), source.shards


def check_shards(ctx: Context) -> Check:
    """Manifest parses (the loader's own reader), the train split lists shards, each file exists and is not empty.
    Why here: a missing shard otherwise fails a worker mid-epoch, possibly in a later stage hours in."""
    problems: list[tuple[str, str]] = []
    files = samples = 0
    seen: set[str] = set()
    for where, spec in _sources(ctx):
        try:
            shards = ctx.shards(spec)
        except Unavailable as exc:
            problems.append(("FAIL", f"{where}: {exc}"))
            continue
        if str(spec) in seen:
            continue
        seen.add(str(spec))
        bad, cut = [], []
        for shard in shards:
            try:
                size = os.stat(shard.path).st_size
            except OSError:
                bad.append(f"{shard.path} is missing")
                continue
            if size == 0:
                bad.append(f"{shard.path} is empty")
            elif size % 512:
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
                count = len(ctx.shards(source.shards))
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
