"""Token-budget packing: with `pack: true` a step is `batch_size` rows of `max_length` tokens filled with whole
samples, so the tokens per step are (nearly) fixed and padding is small.

Why not "a fixed number of samples per step, packed": a handful of samples leaves its last row mostly padding
(measured worse than plain padding at batch 8). Why not "an endless token stream": an exact epoch must end at a
batch count every rank knows before reading a sample, with each sample delivered once, and resume must be exact.

How the epoch stays exact:
- Its length is fixed up front: `epoch_batches` sizes it from the slot's sample count and how many samples a step
  holds when the rendered lengths of a probe (the first samples of each source, read the same way on every rank)
  are packed by the same rule.
- Each slot packs its stream greedily: best-fit into the open rows; a sample that fits nowhere waits (at most
  `LOOKAHEAD` per step, in stream order) and opens the next step. The first `samples_per_slot` samples of the
  slot's epoch are its quota. A slot ahead of schedule fills its last steps past the quota (exact single source:
  flagged `filler`, re-read from its own run, as `uneven: pad` does). A slot behind schedule adds rows to a step
  rather than miss the end: a step takes whatever of the quota left the later steps could not hold at the probe's
  samples per step (so the last step takes all of it).
  So every slot yields exactly `epoch_batches` batches and every quota sample exactly once; the cost of a wrong
  estimate is a few filler rows or a few extra rows in the last steps, never a lost or repeated sample.
- The cursor published with a batch is the slot state *before the oldest waiting sample* plus how many samples
  were read after it and which of them still wait; resume (and the next epoch of a mixture) re-reads those few and
  continues exactly. Samples waiting at the end of an exact single-source epoch are past the quota: dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mmtrain.data.loader.bad_samples import check_sample
from mmtrain.data.loader.shard_plan import Source
from mmtrain.data.loader.tar_index import ShardReader
from mmtrain.data.loader.templates import Renderer

MARGIN = 0.92
"""Samples per step assumed when sizing the epoch, as a fraction of what the probe packs: slack for slots whose
samples run longer than the probe's, so steps rarely add rows; the price is a few filler steps at an epoch's end."""
PROBE = 256
"""Samples per source rendered (not decoded) to estimate how many fit a step."""
LOOKAHEAD = 8
"""Samples that may wait for a later step because they fit in no row (bounds the cursor's replay)."""


def fresh_pack_state() -> dict[str, Any]:
    """`base`: the stream index (in this slot's epoch) of the cursor's snapshot; `ahead`: samples read after it;
    `pending`: offsets (from base) of those still waiting; `quota`: quota samples delivered this epoch."""
    return {"base": 0, "ahead": 0, "pending": [], "quota": 0}


@dataclass
class Probe:
    """Rendered lengths and image counts of the probed samples of each source, with the source weights."""

    lengths: list[list[int]]
    images: list[float]
    weights: list[float]

    def samples_per_budget(self, rows: int, max_length: int) -> float:
        """Samples one step of `rows` × `max_length` holds: each source's probe packed by the loader's own rule,
        combined by weight (steps per sample add up)."""
        steps = sum(w / simulate(lengths, rows, max_length) for lengths, w in zip(self.lengths, self.weights))
        return max(1.0, sum(self.weights) / steps) if steps else float(rows)

    def images_per_sample(self) -> float:
        return sum(i * w for i, w in zip(self.images, self.weights)) / sum(self.weights) if self.weights else 1.0


def best_fit(free: list[int], n: int) -> int | None:
    """The row with the least room that still holds n tokens."""
    best = None
    for r, room in enumerate(free):
        if room >= n and (best is None or room < free[best]):
            best = r
    return best


def simulate(lengths: list[int], rows: int, max_length: int) -> float:
    """Samples per step when `lengths` (repeated) are packed as `SlotPacker._fill` does without quota pressure."""
    if not lengths:
        return float(rows)
    stream = iter(lengths * max(1, -(-rows * 4 // len(lengths))) if len(lengths) < 4 * rows else lengths)
    queue: list[int] = []
    placed_total = steps = 0
    exhausted = False
    while not exhausted or queue:
        free = [max_length] * rows
        misses = i = placed = 0
        while True:
            if i < len(queue):
                n = queue[i]
            elif misses < LOOKAHEAD and max(free) > 0 and not exhausted:
                n = next(stream, None)
                if n is None:
                    exhausted = True
                    break
                queue.append(n)
            else:
                break
            r = best_fit(free, n)
            if r is None:
                misses += 1
                i += 1
                continue
            free[r] -= n
            queue.pop(i)
            placed += 1
        if exhausted and placed == 0 and not queue:
            break
        steps += 1
        placed_total += placed
        if exhausted:  # the last, partial step says little about a long epoch
            steps -= 1 - sum(max_length - f for f in free) / (rows * max_length)
            queue.clear()
    return placed_total / max(steps, 1e-9)


def probe_sources(sources: list[Source], renderer: Renderer, limit: int = PROBE, shards: int = 16) -> Probe:
    """Render `limit` samples of each source, evenly spread over up to `shards` of its shards in manifest order
    (the same on every rank: no shuffle, no images decoded). Unreadable or dropped samples are left out."""
    reader = ShardReader()
    probe = Probe([], [], [])
    try:
        for source in sources:
            picked = [source.shards[i * len(source.shards) // min(shards, len(source.shards))]
                      for i in range(min(shards, len(source.shards)))]
            lengths, counts = [], []
            for shard in picked:
                take = min(shard.samples, -(-limit // len(picked)))
                for j in range(take):
                    try:
                        conversation, _ = check_sample(reader.read(shard.path, j * shard.samples // take))
                        rendered = renderer.render(conversation)
                    except Exception:  # bad or dropped samples: the loader counts them; the probe skips them
                        continue
                    lengths.append(len(rendered))
                    counts.append(len(rendered.image_starts))
            if lengths:
                probe.lengths.append(lengths)
                probe.images.append(sum(counts) / len(counts))
                probe.weights.append(source.weight)
    finally:
        reader.close()
    return probe


def epoch_batches(samples_per_slot: int, probe: Probe, rows: int, max_length: int) -> int:
    """Batches per slot per epoch: enough steps for the slot's samples at the probe's samples per step."""
    return max(1, math.ceil(samples_per_slot / (MARGIN * probe.samples_per_budget(rows, max_length))))


def end_epoch(state: dict, loop: bool) -> None:
    """Carry a slot's packing state into the next epoch: mixtures and resampled streams keep their waiting
    samples (re-read first next epoch); an exact single source drops them (they are past the quota)."""
    pack = state.get("pack")
    if pack is None:
        return
    if loop:
        state["pack"] = {"base": 0, "ahead": pack["ahead"], "pending": list(pack["pending"]), "quota": 0}
    else:
        state["pack"] = fresh_pack_state()
