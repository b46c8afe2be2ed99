"""Collate rendered samples into model batches: dynamic padding, or packing several samples per row.

Batch contract (what the trainer consumes; `train.runtime.model_inputs` turns it into the model's inputs):
- `input_ids`, `labels`, `attention_mask` [B, T] (labels -100 where nothing is learned; mask 1 on real tokens)
- `pixel_values` [N_img, 3, H, W] uint8, resized, not normalized (N_img may be 0; the loader's are channels-last
  views); the trainer moves them to the device and normalizes there (`images.normalize_pixels` with the loader
  batch's `pixel_norm` = (mean, std)), so the model still gets normalized float. `image_slots` long [N_img, 2] =
  (row in batch, start of the image's run of placeholder tokens; with 0 slots the first token after its mark), in
  the order of `pixel_values`
- `filler` bool [num_samples]: samples repeated only to keep ranks in step (see docs/loader.md)
- packed batches add `position_ids` [B, T] (restart at 0 per sample), `segment_ids` [B, T] (1, 2, … per sample in
  its row, 0 on padding), `cu_seqlens` int32 [num_samples + 1] over the rows' real tokens laid end to end and
  `max_seqlen`. The model turns segment ids into the document mask its attention takes (`mmtrain.model.attention`:
  a dense 4D mask for sdpa, a BlockMask for flex, boundaries for varlen). No sample ever attends to another.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mmtrain.data.loader.images import hwc_to_nchw_uint8
from mmtrain.data.loader.templates import IGNORE_INDEX

Pixels = torch.Tensor | Sequence[np.ndarray]


@dataclass
class Example:
    """One rendered sample with its preprocessed images: `pixel_values` is a tensor [n, 3, H, W] (float, or uint8
    the trainer normalizes on the device), or, on the loader's fast path, n uint8 arrays [H, W, 3] as decoded
    (transposed once per batch); n == len(image_starts)."""

    input_ids: list[int]
    labels: list[int]
    image_starts: list[int]
    pixel_values: Pixels | None
    key: str = ""
    filler: bool = False

    def __post_init__(self) -> None:
        n = 0 if self.pixel_values is None else len(self.pixel_values)
        if n != len(self.image_starts):
            raise ValueError(f"{self.key}: {n} images but {len(self.image_starts)} image slot runs")


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _stack_pixels(examples: Sequence[Example], image_shape: tuple[int, int, int]) -> torch.Tensor | list[np.ndarray]:
    """All images of the batch: one tensor [N, 3, H, W] from tensors; from decoded arrays, the list of uint8
    [H, W, 3] arrays as they are (the stream copies them once, into a worker's shared ring or into the batch's
    uint8 tensor)."""
    tensors = [ex.pixel_values for ex in examples if ex.pixel_values is not None and len(ex.pixel_values)]
    if not tensors:
        return torch.zeros((0, *image_shape), dtype=torch.uint8)
    if isinstance(tensors[0], torch.Tensor):
        return torch.cat(tensors)  # type: ignore[arg-type]
    return [a for t in tensors for a in t]


def _slots(placed: Sequence[tuple[int, int, Example]]) -> np.ndarray:
    """(row, offset + start) of every image, in the order of the stacked pixels."""
    slots = [(row, offset + s) for row, offset, ex in placed for s in ex.image_starts]
    return np.array(slots, dtype=np.int64).reshape(-1, 2)


def _filled(row_lengths: np.ndarray, width: int) -> np.ndarray:
    """[rows, width] bool: True on each row's first row_lengths[r] entries (the real tokens)."""
    return np.arange(width)[None, :] < row_lengths[:, None]


def _scatter(filled: np.ndarray, flat: list[int] | np.ndarray, fill: int) -> np.ndarray:
    """[rows, width] int64 array with the `filled` entries taken in order from `flat`. A list of ints goes through
    `array.array` (a C loop; ~25 % less than numpy's generic conversion of a list, measured per batch)."""
    out = np.full(filled.shape, fill, dtype=np.int64)
    out[filled] = np.frombuffer(array.array("q", flat), dtype=np.int64) if isinstance(flat, list) else flat
    return out


def collate_arrays(examples: Sequence[Example], pad_id: int, image_shape: tuple[int, int, int],
                   pad_to_multiple: int = 8) -> dict:
    """Dynamic padding as numpy arrays (+ one pixel tensor): what a worker sends; `to_torch` finishes it. Small
    numpy arrays are pickled through the worker pipe, which is far cheaper than one shared-memory file per tensor."""
    if not examples:
        raise ValueError("empty batch")
    lengths = np.array([len(ex.input_ids) for ex in examples], dtype=np.int64)
    width = _round_up(int(lengths.max()), pad_to_multiple)
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
    filled = _filled(lengths, width)
    return {"input_ids": _scatter(filled, ids, pad_id), "labels": _scatter(filled, labels, IGNORE_INDEX),
            "attention_mask": filled.astype(np.int64),
            "pixel_values": _stack_pixels(examples, image_shape),
            "image_slots": _slots([(i, 0, ex) for i, ex in enumerate(examples)]),
            "filler": np.array([ex.filler for ex in examples], dtype=bool), "keys": [ex.key for ex in examples]}


def to_torch(batch: dict) -> dict:
    """Arrays → tensors (zero-copy). Pixels: uint8 (a stacked tensor [N, 3, H, W], or the decoded [H, W, 3] arrays,
    possibly views into a worker's shared ring) → one uint8 tensor [N, 3, H, W] that owns its memory (the loader's
    batch contract: the trainer normalizes on the device, `images.normalize_pixels`). Float pixels pass through."""
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    pixels = batch["pixel_values"]
    if isinstance(pixels, torch.Tensor) and pixels.is_floating_point():
        out["pixel_values"] = pixels.float()
    elif not isinstance(pixels, torch.Tensor):
        out["pixel_values"] = hwc_to_nchw_uint8(pixels)
    return out


def collate(examples: list[Example], pad_id: int, image_shape: tuple[int, int, int],
            pad_to_multiple: int = 8) -> dict:
    """Pad every sample to the longest in the batch, rounded up to `pad_to_multiple`."""
    return to_torch(collate_arrays(examples, pad_id, image_shape, pad_to_multiple))


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit: assign samples (in order) to rows of at most `max_length` tokens. Deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens > max_length {max_length}; render with max_length set")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def pack_arrays(examples: Sequence[Example], pad_id: int, image_shape: tuple[int, int, int], max_length: int,
                pad_to_multiple: int = 8, rows: list[list[int]] | None = None, min_rows: int = 0) -> dict:
    """Packing as numpy arrays (see `collate_arrays`). `rows` (indices into `examples` per row) defaults to
    first-fit; `min_rows` adds all-padding rows so every step has the same number of rows."""
    if not examples:
        raise ValueError("empty batch")
    if rows is None:
        rows = pack_rows([len(ex.input_ids) for ex in examples], max_length)
    placed: list[tuple[int, int, Example]] = []
    ids: list[int] = []
    labels: list[int] = []
    seqlens: list[int] = []
    row_lengths = np.zeros(max(len(rows), min_rows), dtype=np.int64)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            ex = examples[i]
            placed.append((r, offset, ex))
            ids += ex.input_ids
            labels.append(IGNORE_INDEX)  # the first label of a packed sample never learns from its predecessor
            labels += ex.labels[1:]
            seqlens.append(len(ex.input_ids))
            offset += len(ex.input_ids)
        row_lengths[r] = offset
    width = _round_up(int(row_lengths.max()), pad_to_multiple)
    lens = np.array(seqlens, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    positions = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(starts, lens)
    segments = np.concatenate([np.arange(1, len(row) + 1) for row in rows if row] or [np.zeros(0, np.int64)])
    cu = np.zeros(len(seqlens) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lens)
    filled = _filled(row_lengths, width)
    return {"input_ids": _scatter(filled, ids, pad_id), "labels": _scatter(filled, labels, IGNORE_INDEX),
            "attention_mask": filled.astype(np.int64), "position_ids": _scatter(filled, positions, 0),
            "segment_ids": _scatter(filled, np.repeat(segments, lens), 0),
            "cu_seqlens": cu, "max_seqlen": int(lens.max()),
            "pixel_values": _stack_pixels([ex for _, _, ex in placed], image_shape), "image_slots": _slots(placed),
            "filler": np.array([ex.filler for _, _, ex in placed], dtype=bool), "keys": [ex.key for _, _, ex in placed]}


def pack(examples: list[Example], pad_id: int, image_shape: tuple[int, int, int], max_length: int,
         pad_to_multiple: int = 8) -> dict:
    """Concatenate samples into as few rows of `max_length` as fit; positions restart and attention stays within
    each sample. The first label of every sample is masked so no sample learns from its predecessor's last token."""
    return to_torch(pack_arrays(examples, pad_id, image_shape, max_length, pad_to_multiple))


def padding_waste(batch: dict) -> tuple[int, int]:
    """(pad tokens, all tokens) of a batch, for the padding-waste figure in the bench."""
    total = batch["attention_mask"].numel()
    return total - int(batch["attention_mask"].sum()), total
