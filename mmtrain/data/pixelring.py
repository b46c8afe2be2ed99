"""Shared-memory pixel buffers for DataLoader workers, allocated once and reused batch after batch.

Why: a tensor in a worker's batch reaches the main process as a new shared-memory file each time, and on a VM every
fresh page faults on both sides (measured: ~1.3 ms per 8 × 224² uint8 batch, a third of the decode time). Here each
worker writes its batch's pixels into ring slot `k mod depth` of buffers mapped before the workers fork, and sends
only (worker, slot, k, count). The main process normalizes them out of the slot (a copy) before asking for more.

Safety: the DataLoader keeps at most `prefetch_factor` batches in flight per worker, so while the main process reads
batch k of a worker, that worker writes at most batches k+1 … k+prefetch_factor; `depth = prefetch_factor + 2`
slots never collide. Every slot also carries the batch number it holds, checked after the copy: a collision would
raise instead of silently mixing images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

PREFETCH = 2


class PixelRing:
    """[workers, depth, capacity, H, W, 3] uint8 in shared memory plus the batch number held by each slot."""

    DEPTH = PREFETCH + 2

    def __init__(self, workers: int, capacity: int, size: int, depth: int = DEPTH):
        self.depth, self.capacity = depth, capacity
        self.pixels = torch.empty((workers, depth, capacity, size, size, 3), dtype=torch.uint8).share_memory_()
        self.stamp = torch.full((workers, depth), -1, dtype=torch.int64).share_memory_()

    def put(self, worker: int, k: int, images: Sequence[np.ndarray]) -> tuple[int, int, int, int] | None:
        """Copy batch k's images into its slot (in the worker); None when they do not fit (sent as a tensor)."""
        if len(images) > self.capacity or (images and images[0].shape != self.pixels.shape[3:]):
            return None
        slot = k % self.depth
        dst = self.pixels[worker, slot].numpy()
        for i, img in enumerate(images):
            dst[i] = img
        self.stamp[worker, slot] = k
        return (worker, slot, k, len(images))

    def view(self, ref: tuple[int, int, int, int]) -> np.ndarray:
        worker, slot, _, count = ref
        return self.pixels[worker, slot, :count].numpy()

    def check(self, ref: tuple[int, int, int, int]) -> None:
        """After copying out: the slot must still hold the batch we read."""
        worker, slot, k, _ = ref
        if int(self.stamp[worker, slot]) != k:
            raise RuntimeError(f"pixel ring slot {slot} of worker {worker} was overwritten while batch {k} was read")
