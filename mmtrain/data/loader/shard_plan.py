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

from braceexpand import braceexpand

from mmtrain.data import remote_files
from mmtrain.data.remote_files import FetchError, FetchOptions
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
    """One entry of a stage's data mixture: shard sets (manifest files, their directories or URLs) and a weight."""

    shards: list[Shard]
    weight: float = 1.0
    name: str = ""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def load_shards(manifests: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train",
                fetch: FetchOptions | None = None) -> list[Shard]:
    """Shard list (absolute paths or URLs, sample counts) from one or more shard sets, in the order given.

    Each entry is a shard-set directory or its manifest.json, local or a URL (`s3://`, `gs://`, `https://` …: its
    manifest at `URL/manifest.json`), or shard files named with a brace range (`…/train-{000000..000003}.tar`,
    webdataset's notation): those shards, in that order, with their sample counts from the manifest.json beside them."""
    if isinstance(manifests, (str, os.PathLike)):
        manifests = [manifests]
    fetch = fetch if fetch is not None else FetchOptions()
    shards: list[Shard] = []
    for entry in manifests:
        entry = os.fspath(entry)
        names = list(braceexpand(entry)) if "{" in entry else [entry]
        if names[0].endswith(".tar"):
            shards += _named_shards(names, split, fetch)
            continue
        for name in names:
            where, manifest = _read_manifest(name, fetch)
            shards += [Shard(_inside(where, s["name"]), int(s["samples"])) for s in _split_shards(where, manifest,
                                                                                                   split)]
    if not shards:
        raise UserError(f"no {split} shards in {', '.join(map(str, manifests))}")
    return shards


def _inside(folder: str, name: str) -> str:
    return remote_files.join(folder, name) if remote_files.is_url(folder) else str(Path(folder) / name)


def _read_manifest(entry: str, fetch: FetchOptions) -> tuple[str, dict]:
    """(the shard set's folder, its parsed manifest) for a folder or manifest path / URL."""
    if remote_files.is_url(entry):
        url = entry if entry.endswith(".json") else remote_files.join(entry, "manifest.json")
        try:
            text = remote_files.read_bytes(url, fetch)
        except FetchError as exc:
            if isinstance(exc.cause, FileNotFoundError):
                raise UserError(f"{url}: no manifest.json (build shards with `mmtrain shards build --out URL`; an "
                                "upload that stopped half-way has none)") from exc
            raise UserError(f"cannot read {url}: {exc.detail}") from exc
        where = remote_files.parent(url)
    else:
        path = Path(entry)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise UserError(f"{path}: no manifest.json (build shards with `mmtrain shards build`)")
        text, where, url = path.read_bytes(), str(path.parent), str(path)
    manifest = json.loads(text)
    if manifest.get("format") != "mmtrain-shards":
        raise UserError(f"{url}: not an mmtrain shard manifest")
    return where, manifest


def _split_shards(where: str, manifest: dict, split: str) -> list[dict]:
    if split not in manifest.get("splits", {}):
        raise UserError(f"{where}: no split {split!r} (has {', '.join(manifest.get('splits', {}))})")
    return manifest["splits"][split]["shards"]


def _named_shards(paths: list[str], split: str, fetch: FetchOptions) -> list[Shard]:
    """Shards named one by one (a brace range), each counted by the manifest of its folder; a name the manifest's
    split does not list is refused, naming it."""
    manifests: dict[str, dict[str, int]] = {}
    shards = []
    for path in paths:
        folder, name = (remote_files.parent(path), path.rstrip("/").rsplit("/", 1)[-1]) if remote_files.is_url(
            path) else (str(Path(path).parent), Path(path).name)
        if folder not in manifests:
            where, manifest = _read_manifest(folder, fetch)
            manifests[folder] = {s["name"]: int(s["samples"]) for s in _split_shards(where, manifest, split)}
        if name not in manifests[folder]:
            raise UserError(f"{path}: not a {split} shard of {_inside(folder, 'manifest.json')} (a shard the manifest "
                            "does not list has no sample count; rebuild the set or fix the range)")
        shards.append(Shard(_inside(folder, name), manifests[folder][name]))
    return shards


def make_sources(spec: Sequence[dict] | str | os.PathLike, split: str = "train",
                 fetch: FetchOptions | None = None) -> list[Source]:
    """A stage's data: a list of `{shards: DIR | URL | [DIR, ...], weight: float}`, or one shard set."""
    if isinstance(spec, (str, os.PathLike)):
        spec = [{"shards": spec, "weight": 1.0}]
    sources = []
    for i, entry in enumerate(spec):
        weight = float(entry.get("weight", 1.0))
        if weight <= 0:
            raise UserError(f"data source {i}: weight must be > 0, got {weight}")
        shards = load_shards(entry["shards"], split, fetch)
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
