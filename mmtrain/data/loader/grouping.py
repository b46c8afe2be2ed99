"""Modality- and length-grouped batches (`group_by: modality_length`): each micro-batch holds image samples or
text-only samples of similar rendered length, so padding drops and a batch rarely pays for both kinds (LLaVA's
`group_by_modality_length`, on a stream).

How, per slot: the epoch's batches are taken in windows of `group_window` batches (the last window may be shorter).
A window's samples are read as without grouping (same stream, same skips and fillers), split into image samples (an
image survives truncation) and text-only ones, each sorted by rendered length (images ascending, text descending: the
one batch that may straddle the two kinds then holds the longest of each), cut into the window's batch sizes and
handed out in a seeded shuffled order.

The shuffle's seed leaves out the rank: the slots that feed the same step on every rank (the same worker index) apply
the same permutation to their sorted batches, so at a step the ranks mostly hold the same modality and the same
length quantile (they differ only where one rank's window has more batches of a kind). A synchronous step waits for
its slowest rank, so a text-only batch saves time only when the other ranks' batches are light too.

What stays exact:
- Epochs: a window holds exactly the samples of its batches, so a slot delivers the same samples per epoch as without
  grouping, in the same number of batches of the same sizes; only their order inside a window changes.
- Resume: the cursor published with a batch inside a window is the slot state *before the window's first sample*,
  with `batches` counting the batches handed out. Resume re-reads the window (the stream is a function of that
  state), groups it the same way and skips the batches already handed out. The window's last batch publishes the
  state after the window: nothing to replay. So the counts in a cursor (`read`, `skipped`) cover whole windows.
- Pixels: a window's images are decoded into arrays of their own (they leave in different batches, so not into one
  batch's ring slot) and copied into the ring slot of the batch that carries them.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Protocol, Sequence

from mmtrain.data.loader.collate import Example
from mmtrain.errors import UserError


class GroupedStream(Protocol):
    """What a grouper needs of its slot's stream (`slot.SlotStream`): its state and cursors, and the reading,
    collating and pixel-shipping it does without grouping."""

    state: dict[str, Any]
    cursors: list[Any]
    cfg: Any
    slot: int
    plan: Any
    reader: Any

    def _examples(self, size: int, in_ring: bool = True) -> list[Example]: ...

    def _collate(self, examples: list[Example]) -> dict: ...

    def ship_pixels(self, batch: dict, waiting: Sequence[Example] = ()) -> None: ...

GROUP_BY = ("none", "modality_length")
WINDOW = 16
"""Default `group_window`: batches read and grouped together. Wider groups lengths more tightly, at the cost of one
window's decoded images held per worker and up to one window re-read on resume."""


def check_config(group_by: str, window: int, pack: bool) -> None:
    """UserError naming the knob for a value the loader cannot honour."""
    if group_by not in GROUP_BY:
        raise UserError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if window < 1:
        raise UserError(f"group_window (batches per grouping window) must be >= 1, got {window}")
    if pack and group_by != "none":
        raise UserError(f"group_by: {group_by} cannot be combined with pack: true (packing fills rows by token "
                        "budget, so there is little padding to save); set one of them")


def layout(group_by: str, window: int) -> str:
    """What a cursor records of the grouping: cursors are only exact under the same grouping."""
    return "none" if group_by == "none" else f"{group_by}/{window}"


def has_images(example: Example) -> bool:
    """The sample's modality: image if at least one image survived rendering (truncation may cut them all)."""
    return bool(example.image_starts)


def group_window(examples: Sequence[Example], sizes: Sequence[int], key: str) -> list[list[Example]]:
    """One window's batches: image samples by ascending length, then text-only by descending length, cut into
    `sizes` (in order) and shuffled with `random.Random(key)`. At most one batch holds both kinds."""
    if sum(sizes) != len(examples):
        raise ValueError(f"window of {len(examples)} samples cut into batches of {list(sizes)}")
    images = sorted((ex for ex in examples if has_images(ex)), key=lambda ex: len(ex.input_ids))
    text = sorted((ex for ex in examples if not has_images(ex)), key=lambda ex: -len(ex.input_ids))
    ordered = images + text
    batches, k = [], 0
    for size in sizes:
        batches.append(ordered[k:k + size])
        k += size
    random.Random(key).shuffle(batches)
    return batches


class SlotGrouper:
    """Runs one slot's grouped epoch on top of its stream (which reads, renders, decodes, counts and ships)."""

    def __init__(self, stream: GroupedStream, sizes: list[int], window: int):
        self.s, self.sizes, self.window = stream, sizes, window

    def _snapshot(self) -> dict:
        """The parts of the slot state that reading moves: source positions, counts, the mixer's draws."""
        st = self.s.state
        return {"sources": [dict(c.position) for c in self.s.cursors], "read": st.get("read", 0),
                "dropped": dict(st["dropped"]), "draws": st["draws"]}

    def _cursor(self, snapshot: dict) -> dict:
        """The slot state to publish: the live one (epoch, batches handed out) with `snapshot`'s positions."""
        st = self.s.state
        return {**st, **snapshot, "sources": [dict(p) for p in snapshot["sources"]],
                "dropped": dict(snapshot["dropped"])}

    def batches_iter(self) -> Iterator[dict]:
        """The rest of the slot's epoch, window by window, each batch with its cursor (as `SlotStream.batches`)."""
        s = self.s
        done = s.state["batches"]
        start = done if done >= len(self.sizes) else done - done % self.window  # a cursor inside a window holds
        # the state from before it: replay the window (one at the epoch's end holds the state after the last)
        try:
            while start < len(self.sizes):
                sizes = self.sizes[start:start + self.window]
                before = self._snapshot()
                examples = s._examples(sum(sizes), in_ring=False)
                after = self._snapshot()
                s.state["sources"] = after["sources"]
                key = f"group:{s.cfg.seed}:{s.slot % s.plan.workers}:{s.state['epoch']}:{start}"  # not the rank
                batches = group_window(examples, sizes, key)
                for i in range(done - start, len(batches)):
                    s.state["batches"] = start + i + 1
                    batch = s._collate(batches[i])
                    s.ship_pixels(batch)
                    batch["cursor"] = (s.slot, self._cursor(after if i == len(batches) - 1 else before))
                    batches[i] = []  # its images are in the ring (or the batch) now: let them go
                    yield batch
                start += len(sizes)
                done = start
        finally:
            s.reader.close()
