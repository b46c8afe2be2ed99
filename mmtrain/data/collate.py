"""Collate rendered samples into model batches: dynamic padding, or packing several samples per row.

Batch contract (what the model consumes):
- `input_ids`, `labels`, `attention_mask` [B, T] (labels -100 where nothing is learned; mask 1 on real tokens)
- `pixel_values` [N_img, 3, H, W] float, N_img may be 0; `image_slots` long [N_img, 2] = (row in batch, start of the
  image's run of placeholder tokens), in the order of `pixel_values`
- `filler` bool [num_samples]: samples repeated only to keep ranks in step (see docs/loader.md)
- packed batches add `position_ids` [B, T] (restart at 0 per sample), `segment_ids` [B, T] (1, 2, … per sample in
  its row, 0 on padding), `cu_seqlens` int32 [num_samples + 1] over the rows' real tokens laid end to end and
  `max_seqlen`. `block_causal_mask(segment_ids)` turns segment ids into the 4D additive mask eager/sdpa attention
  takes; flash-attention varlen takes `cu_seqlens` directly. No sample ever attends to another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mmtrain.data.template import IGNORE_INDEX


@dataclass
class Example:
    """One rendered sample with its preprocessed images (`pixel_values` [n, 3, H, W] with n == len(image_starts))."""

    input_ids: list[int]
    labels: list[int]
    image_starts: list[int]
    pixel_values: torch.Tensor | None
    key: str = ""
    filler: bool = False

    def __post_init__(self) -> None:
        n = 0 if self.pixel_values is None else int(self.pixel_values.shape[0])
        if n != len(self.image_starts):
            raise ValueError(f"{self.key}: {n} images but {len(self.image_starts)} image slot runs")


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


Normalize = Callable[[torch.Tensor], torch.Tensor]


def _images(rows: list[tuple[int, int, Example]], image_shape: tuple[int, int, int],
            normalize: Normalize | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack pixel values of (row, offset, example) triples and index each image by (row, slot start).
    uint8 pixels are normalized here, once per batch, with `normalize`."""
    pixels, slots = [], []
    for row, offset, ex in rows:
        if ex.pixel_values is not None and len(ex.image_starts):
            pixels.append(ex.pixel_values)
            slots += [(row, offset + s) for s in ex.image_starts]
    if not pixels:
        return torch.zeros((0, *image_shape)), torch.zeros((0, 2), dtype=torch.long)
    stacked = torch.cat(pixels)
    if stacked.dtype == torch.uint8:
        if normalize is None:
            raise ValueError("uint8 pixel values need a normalize function")
        return normalize(stacked), torch.tensor(slots, dtype=torch.long)
    return stacked.float(), torch.tensor(slots, dtype=torch.long)


def collate(examples: list[Example], pad_id: int, image_shape: tuple[int, int, int],
            pad_to_multiple: int = 8, normalize: Normalize | None = None) -> dict:
    """Pad every sample to the longest in the batch, rounded up to `pad_to_multiple`."""
    if not examples:
        raise ValueError("empty batch")
    width = _round_up(max(len(ex.input_ids) for ex in examples), pad_to_multiple)
    bsz = len(examples)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        attention[i, :n] = 1
    pixels, slots = _images([(i, 0, ex) for i, ex in enumerate(examples)], image_shape, normalize)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "pixel_values": pixels,
            "image_slots": slots, "filler": torch.tensor([ex.filler for ex in examples]),
            "keys": [ex.key for ex in examples]}


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


def pack(examples: list[Example], pad_id: int, image_shape: tuple[int, int, int], max_length: int,
         pad_to_multiple: int = 8, normalize: Normalize | None = None) -> dict:
    """Concatenate samples into as few rows of `max_length` as fit; positions restart and attention stays within
    each sample. The first label of every sample is masked so no sample learns from its predecessor's last token."""
    if not examples:
        raise ValueError("empty batch")
    rows = pack_rows([len(ex.input_ids) for ex in examples], max_length)
    width = _round_up(max(sum(len(examples[i].input_ids) for i in row) for row in rows), pad_to_multiple)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    placed: list[tuple[int, int, Example]] = []
    seqlens: list[int] = []
    for r, row in enumerate(rows):
        offset = 0
        for seg, i in enumerate(row, start=1):
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[r, offset:offset + n] = torch.tensor(ex.input_ids)
            labels[r, offset:offset + n] = torch.tensor(ex.labels)
            labels[r, offset] = IGNORE_INDEX
            attention[r, offset:offset + n] = 1
            position_ids[r, offset:offset + n] = torch.arange(n)
            segment_ids[r, offset:offset + n] = seg
            placed.append((r, offset, ex))
            seqlens.append(n)
            offset += n
    pixels, slots = _images(placed, image_shape, normalize)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens), 0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": position_ids,
            "segment_ids": segment_ids, "cu_seqlens": cu, "max_seqlen": max(seqlens), "pixel_values": pixels,
            "image_slots": slots, "filler": torch.tensor([ex.filler for _, _, ex in placed]),
            "keys": [ex.key for _, _, ex in placed]}


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] segment ids → [B, 1, T, T] additive mask: 0 where a token may attend (same sample, not in the
    future), the dtype's minimum elsewhere. Padding attends only to itself so no row is all-masked (no NaN)."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def padding_waste(batch: dict) -> tuple[int, int]:
    """(pad tokens, all tokens) of a batch, for the padding-waste figure in the bench."""
    total = batch["attention_mask"].numel()
    return total - int(batch["attention_mask"].sum()), total
