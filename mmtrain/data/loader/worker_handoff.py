"""Batches cross from a DataLoader worker to the main process several at a time (a *transfer*: `chunking.chunked`
on the worker's batches), and are put back in the order that one batch per DataLoader item gives: slot after slot,
round-robin, from the epoch's rotation.

Why: every DataLoader item pays a fixed hand-off, whatever it holds: the index queue, the put, the queue's feeder
thread, pickling, and the wake-ups of two processes. On the 2-vCPU development VM that cost more than the batch's
collate (~330 µs per item in the worker; CHANGELOG.md, "Transfers"). A transfer of ~`transfer_samples` samples pays
it once for several batches. What a rank sees is unchanged: the same batches, in the same order, with the same cursor
after each.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterator, Sequence

TRANSFER_SAMPLES = 32
"""Default samples per DataLoader item (`LoaderConfig.transfer_samples`), rounded up to whole batches. The pixel ring
holds (prefetch + 2) transfers per worker (pixel_buffers.py), so this also sizes the ring."""


def batches_per_transfer(samples_per_batch: float, workers: int, samples: int = TRANSFER_SAMPLES) -> int:
    """Whole batches per DataLoader item for about `samples` samples: 1 without workers (nothing crosses a
    process)."""
    if workers == 0:
        return 1
    return max(1, math.ceil(samples / max(samples_per_batch, 1.0)))


def in_slot_order(items: Iterator[list[dict]], slots: Sequence[int], start: int, count: int) -> Iterator[dict]:
    """The batches numbered `start` … `count - 1` of a rank's epoch, batch b from `slots[b % len(slots)]`.

    Each slot yields the same number of batches per epoch, and the DataLoader starts the epoch at the slot of batch
    `start` (stream.py's rotation), so a transfer is taken only when the slot due next has nothing waiting: at most
    one transfer per slot waits here, and a worker's transfer is finished before its next one is taken (the pixel
    ring's safety depends on this). More batches than `count` is a bug in the epoch arithmetic: it raises."""
    waiting: dict[int, deque] = {slot: deque() for slot in slots}
    for b in range(start, count):
        due = slots[b % len(slots)]
        while not waiting[due]:
            item = next(items, None)
            if item is None:
                raise RuntimeError(f"the workers ended the epoch at batch {b} of {count} (slot {due} had none left)")
            for batch in item:
                waiting[batch["cursor"][0]].append(batch)
        yield waiting[due].popleft()
    left = sum(len(q) for q in waiting.values()) + sum(len(item) for item in items)
    if left:
        raise RuntimeError(f"the workers yielded {left} batches past the epoch's {count}")
