"""Shared-memory pixel buffers for DataLoader workers, allocated once and reused batch after batch.

Why: a tensor in a worker's batch reaches the main process as a new shared-memory file each time, and on a VM every
fresh page faults on both sides (measured: ~1.3 ms per 8 × 224² uint8 batch, a third of the decode time). Here each
worker decodes its batch's images straight into ring slot `k mod depth` of buffers mapped before the workers fork
(`RingWriter`: no copy for an image already at the model size, ~16 µs per 224² image saved) and sends only
(worker, slot, k, positions). The main process copies them out of the slot (uint8; the trainer normalizes them on
the device) before asking for more.

Safety: the DataLoader keeps at most `prefetch_factor` items in flight per worker, each a transfer of T batches
(worker_handoff.py), and the main process finishes a worker's transfer before it takes that worker's next one. So a worker
starts transfer t only once the main process has received transfer t - prefetch, i.e. is done with every batch before
(t - prefetch) T; while it writes batch k <= (t + 1) T - 1, the main process reads no batch before (t - prefetch) T,
and `depth = (prefetch + 2) T` slots never collide: they need more than (prefetch + 1) T (T = 1: prefetch + 2).
Every slot carries the batch number it holds, set *before* the worker's first write into it and checked after the
main process's copy: a collision would raise instead of silently mixing images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

PREFETCH = 2
Ref = tuple[int, int, int, "int | tuple[int, ...]"]
"""(worker, slot, batch number, image positions in the slot: a count n for positions 0 … n-1, else the positions)."""


class PixelRing:
    """[workers, depth, capacity, H, W, 3] uint8 in shared memory plus the batch number held by each slot."""

    def __init__(self, workers: int, capacity: int, size: int, depth: int):
        self.depth, self.capacity = depth, capacity
        self.pixels = torch.empty((workers, depth, capacity, size, size, 3), dtype=torch.uint8).share_memory_()
        self.stamp = torch.full((workers, depth), -1, dtype=torch.int64).share_memory_()
        self._np: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_np": None}  # numpy views are rebuilt in the receiving process, never copied

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views of (pixels, stamp): indexing them costs a fraction of indexing the tensors."""
        if self._np is None:
            self._np = (self.pixels.numpy(), self.stamp.numpy())
        return self._np

    def view(self, ref: Ref) -> np.ndarray | list[np.ndarray]:
        """The batch's images in batch order: one [n, H, W, 3] view, or a list of [H, W, 3] views."""
        worker, slot, _, where = ref
        dst = self.arrays[0][worker, slot]
        if isinstance(where, int):
            return dst[:where]
        return [dst[i] for i in where]

    def check(self, ref: Ref) -> None:
        """After copying out: the slot must still hold the batch we read."""
        worker, slot, k, _ = ref
        if int(self.arrays[1][worker, slot]) != k:
            raise RuntimeError(f"pixel ring slot {slot} of worker {worker} was overwritten while batch {k} was read")


class RingWriter:
    """One worker's side of the ring: hands out the positions of the slot of the batch being produced, so images are
    decoded in place, then ships the batch as positions. Batch numbers count from 0 per worker iteration."""

    def __init__(self, ring: PixelRing, worker: int):
        self.ring, self.worker = ring, worker
        self.k = 0
        self._handed = 0  # positions of batch k's slot handed out so far
        self._claimed = False

    def _slot(self) -> np.ndarray:
        pixels, stamp = self.ring.arrays
        slot = self.k % self.ring.depth
        if not self._claimed:  # stamp first: a reader still on this slot's last batch then fails its check
            stamp[self.worker, slot] = self.k
            self._claimed = True
        return pixels[self.worker, slot]

    def buffer(self) -> np.ndarray | None:
        """The next free position of batch k's slot, or None when the slot is full (the image gets its own array)."""
        n = self._handed
        if n >= self.ring.capacity:
            return None
        self._handed = n + 1
        return self._slot()[n]

    def ship(self, images: Sequence[np.ndarray], waiting: Sequence[list[np.ndarray]] = ()) -> Ref | None:
        """Batch k's images (in batch order) as a ring reference, or None (then send them as a tensor). `waiting`: the
        image lists of samples read for this batch that wait for a later one (packing): their images that sit in this
        slot move to the next batch's slot, in place in those lists, before this slot can be reused. Moving them now
        is safe: while the worker produces batch k the main process is done with batch k + 1 - depth, the next
        slot's last batch (the module's docstring)."""
        slot = self._slot()
        base = _address(slot)
        carry = [(pixels, i) for pixels in waiting for i, img in enumerate(pixels) if _position(slot, base, img) >= 0]
        ref: Ref | None = None
        if len(images) <= self.ring.capacity and (not images or images[0].shape == slot.shape[1:]):
            positions = [_position(slot, base, img) for img in images]
            taken = set(positions).union(_position(slot, base, pixels[i]) for pixels, i in carry)
            free = (p for p in range(self.ring.capacity) if p not in taken)
            for i, p in enumerate(positions):
                if p < 0:  # decoded elsewhere (the slot was full, or a sample read for an earlier batch): copy in
                    p = positions[i] = next(free, -1)
                    if p < 0:
                        break
                    slot[p] = images[i]
            n = len(positions)
            if min(positions, default=0) >= 0:
                ref = (self.worker, self.k % self.ring.depth, self.k,
                       n if positions == list(range(n)) else tuple(positions))
        self.k += 1
        self._handed, self._claimed = 0, False
        for pixels, i in carry:
            dst = self.buffer()
            if dst is None:
                pixels[i] = pixels[i].copy()
            else:
                dst[...] = pixels[i]
                pixels[i] = dst
        return ref


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _position(slot: np.ndarray, base: int, img: np.ndarray) -> int:
    """Which position of `slot` ([capacity, H, W, 3] at address `base`) the array `img` is, or -1 if none."""
    if not isinstance(img, np.ndarray) or img.shape != slot.shape[1:] or not img.flags.c_contiguous:
        return -1
    stride = slot.strides[0]
    offset = _address(img) - base
    if 0 <= offset < slot.shape[0] * stride and offset % stride == 0:
        return offset // stride
    return -1
