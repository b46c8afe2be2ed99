"""One source's samples as one slot reads them, with a position small enough to checkpoint.

The position is (epoch, k = segment index in the slot's plan, offset = start of the current shuffle block in the
segment, pos = samples of that block already taken, filler). Resuming recomputes the plan, seeks to the shard
(shard granularity), recomputes the block's seeded permutation and reads only the samples not yet taken (sample
granularity): nothing consumed is read again.

Shuffling is a seeded shard order per epoch plus a seeded permutation inside blocks of `shuffle_buffer` consecutive
samples of a shard. webdataset's `shuffle(n)` is a reservoir whose state is the samples it holds; ours has the same
reach (n samples) and a state that is one integer.
"""

from __future__ import annotations

from typing import Any

from mmtrain.data.loader.shard_plan import (Segment, Source, block_permutation, epoch_order, exact_segments,
                               resampled_segment)
from mmtrain.data.loader.tar_index import ShardReader
from mmtrain.errors import UserError


def fresh_position(epoch: int = 0) -> dict[str, Any]:
    return {"epoch": epoch, "k": 0, "offset": 0, "pos": 0, "filler": False}


class SourceCursor:
    """Yields (raw sample, filler) for one source and one slot, in plan order, and can say where it is.

    mode `exact`: each epoch reads the slot's run of the epoch's shard order once; then either the next epoch
    (`loop`, used inside mixtures) or, for a single exact source, the slot's run again flagged as filler (samples
    that only keep ranks in step). mode `resampled`: an endless stream of seeded shard draws.
    """

    def __init__(self, source: Source, index: int, slot: int, num_slots: int, seed: int, mode: str, loop: bool,
                 shuffle: bool, shuffle_buffer: int, reader: ShardReader, position: dict | None = None):
        if mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}")
        if source.samples == 0:
            raise UserError(f"data source {source.name!r} has no samples")
        self.source, self.index, self.slot, self.num_slots = source, index, slot, num_slots
        self.seed, self.mode, self.loop, self.shuffle = seed, mode, loop, shuffle
        self.block = max(1, shuffle_buffer) if shuffle else 1
        self.reader = reader
        self.position = dict(position) if position is not None else fresh_position()
        self._segments: tuple[tuple[int, bool], list[Segment]] | None = None
        self._perm: tuple[tuple, list[int]] | None = None

    def _epoch_segments(self, epoch: int, filler: bool) -> list[Segment]:
        if self._segments is not None and self._segments[0] == (epoch, filler):
            return self._segments[1]
        order = epoch_order(len(self.source.shards), self.seed, self.index, epoch, self.shuffle)
        segments = exact_segments(self.source.shards, order, self.slot, self.num_slots)
        if filler and not segments:  # more slots than samples: repeat the whole source
            segments = exact_segments(self.source.shards, order, 0, 1)
        self._segments = ((epoch, filler), segments)
        return segments

    def _segment(self, p: dict) -> Segment | None:
        if self.mode == "resampled":
            return resampled_segment(self.source.shards, self.seed, self.index, self.slot, p["k"])
        segments = self._epoch_segments(p["epoch"], p["filler"])
        return segments[p["k"]] if p["k"] < len(segments) else None

    def _permutation(self, p: dict, size: int) -> list[int]:
        if not self.shuffle:
            return list(range(size))
        key = (p["epoch"], p["k"], p["offset"], p["filler"], size)
        if self._perm is None or self._perm[0] != key:
            self._perm = (key, block_permutation(size, self.seed, self.index, self.slot, *key))
        return self._perm[1]

    def next(self) -> tuple[dict, bool]:
        """Read the next sample and advance the position past it."""
        p = self.position
        restarts = 0
        while True:
            seg = self._segment(p)
            if seg is None:  # end of the slot's run for this epoch (exact mode)
                restarts += 1
                if restarts > 2:
                    raise UserError(f"data source {self.source.name!r}: slot {self.slot} has nothing to read")
                if self.loop:
                    p.update(fresh_position(p["epoch"] + 1))
                else:
                    p.update(fresh_position(p["epoch"]), filler=True)
                continue
            if p["offset"] >= len(seg):
                p.update(k=p["k"] + 1, offset=0, pos=0)
                continue
            size = min(self.block, len(seg) - p["offset"])
            if p["pos"] >= size:
                p.update(offset=p["offset"] + size, pos=0)
                continue
            at = seg.start + p["offset"] + self._permutation(p, size)[p["pos"]]
            p["pos"] += 1
            return self.reader.read(seg.path, at), bool(p["filler"])
