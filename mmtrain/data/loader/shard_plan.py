"""Shard arithmetic: which samples of which shards each (rank, worker) slot reads in each epoch.

Everything here is a pure function of (seed, source, epoch, slot, number of slots) and the manifest's sample counts,
so any process can recompute any slot's plan, and a cursor only needs to store positions in it.

Exact epochs: the source's shards are put in a seeded order for the epoch and their samples laid end to end; slot s
of S takes the contiguous run [s·N/S, (s+1)·N/S). Runs differ by at most one sample, cut through shards where
needed (a slot may start in the middle of a shard: it seeks there). Resampled: slot s draws shard k of its infinite
stream with a seeded RNG and reads it whole.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mmtrain.errors import UserError


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard."""

    path: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class Source:
    """One entry of a stage's data mixture: shard sets (manifest files or their directories) and a weight."""

    shards: list[Shard]
    weight: float = 1.0
    name: str = ""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def load_shards(manifests: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train") -> list[Shard]:
    """Shard list (absolute paths, sample counts) from one or more shard-set manifests, in manifest order."""
    if isinstance(manifests, (str, os.PathLike)):
        manifests = [manifests]
    shards: list[Shard] = []
    for m in manifests:
        path = Path(m)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise UserError(f"{path}: no manifest.json (build shards with `mmtrain shards build`)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != "mmtrain-shards":
            raise UserError(f"{path}: not an mmtrain shard manifest")
        if split not in manifest.get("splits", {}):
            raise UserError(f"{path}: no split {split!r} (has {', '.join(manifest.get('splits', {}))})")
        for s in manifest["splits"][split]["shards"]:
            shards.append(Shard(str(path.parent / s["name"]), int(s["samples"])))
    if not shards:
        raise UserError(f"no {split} shards in {', '.join(map(str, manifests))}")
    return shards


def make_sources(spec: Sequence[dict] | str | os.PathLike, split: str = "train") -> list[Source]:
    """A stage's data: a list of `{shards: DIR | [DIR, ...], weight: float}`, or one shard set."""
    if isinstance(spec, (str, os.PathLike)):
        spec = [{"shards": spec, "weight": 1.0}]
    sources = []
    for i, entry in enumerate(spec):
        weight = float(entry.get("weight", 1.0))
        if weight <= 0:
            raise UserError(f"data source {i}: weight must be > 0, got {weight}")
        shards = load_shards(entry["shards"], split)
        sources.append(Source(shards, weight, str(entry.get("name") or entry["shards"])))
    return sources


def epoch_order(num_shards: int, seed: int, source: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Seeded shard order of one source in one epoch; every rank and worker computes the same one."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{source}:{epoch}").shuffle(order)
    return order


def slot_bounds(total: int, slot: int, num_slots: int) -> tuple[int, int]:
    """Contiguous, balanced split of `total` samples: slot sizes differ by at most one and cover all exactly once."""
    start, stop = slot * total // num_slots, (slot + 1) * total // num_slots
    assert 0 <= start <= stop <= total
    return start, stop


def exact_segments(shards: Sequence[Shard], order: Sequence[int], slot: int, num_slots: int) -> list[Segment]:
    """The slot's run of the epoch's samples (shards in `order`, laid end to end), as per-shard segments."""
    total = sum(s.samples for s in shards)
    lo, hi = slot_bounds(total, slot, num_slots)
    segments, base = [], 0
    for i in order:
        shard = shards[i]
        a, b = max(lo, base), min(hi, base + shard.samples)
        if a < b:
            segments.append(Segment(shard.path, a - base, b - base))
        base += shard.samples
    assert sum(len(s) for s in segments) == hi - lo
    return segments


def resampled_segment(shards: Sequence[Shard], seed: int, source: int, slot: int, k: int) -> Segment:
    """Shard k of a slot's infinite resampled stream (drawn with replacement, seeded per draw)."""
    i = random.Random(f"resample:{seed}:{source}:{slot}:{k}").randrange(len(shards))
    return Segment(shards[i].path, 0, shards[i].samples)


def block_permutation(size: int, seed: int, *parts: object) -> list[int]:
    """Seeded permutation of a block of `size` samples: the shuffle buffer, recomputable from its seed alone."""
    perm = list(range(size))
    random.Random(":".join(map(str, ("block", seed, *parts)))).shuffle(perm)
    return perm


def samples_per_slot(total: int, num_slots: int, uneven: str) -> int:
    """Samples every slot yields per epoch: `pad` → ceil(total / slots) (short slots repeat samples, flagged
    filler), `trim` → floor (the remainder, at most slots − 1 samples, waits for the next epoch's order)."""
    if uneven == "pad":
        return -(-total // num_slots)
    if uneven == "trim":
        return total // num_slots
    raise ValueError(f"uneven must be 'pad' or 'trim', got {uneven!r}")
