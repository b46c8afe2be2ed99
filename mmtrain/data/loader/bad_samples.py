"""Bad samples in shards: why a sample is skipped, the one warning that names it, and the checks that find it.

A shard can go bad after it was built (a copy cut short, a bit flip, a hand-edited member). The loader must not let
one bad sample stop a week-long run, and must not hide it either: each bad sample is skipped with one warning naming
shard, key and reason, counted under that reason in the slot's cursor state (so counts are exact for the batches the
trainer consumed, and survive a resume), and replaced by the next sample, so every rank still yields the same number
of batches. With `on_bad_sample: raise` the same check raises `BadSample` (a ValueError naming shard, key and reason).
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mmtrain.data.loader.images import ImageConfig, ImageTooLarge, decode_hwc, finish_hwc, finished
from mmtrain.data.loader.templates import IMAGE_TOKEN

DATA_REASONS = ("truncated_shard", "bad_json", "missing_fields", "bad_image", "image_too_large",
                "image_count_mismatch", "bad_sample", "unreachable_shard")
"""Reasons a sample is unreadable (skipped with a warning, or raised). `bad_sample` is the catch-all for anything else
the sample's content makes the template or decoder reject (e.g. `<image>` inside an assistant turn);
`unreachable_shard` counts each sample read from a shard URL that could not be fetched (data/remote_files.py)."""
TEMPLATE_REASONS = ("no_label", "no_label_after_truncation", "too_long")
"""Readable samples the template drops (nothing to learn within max_length): counted, never warned about."""
IMAGE_EXTS = ("jpg", "jpeg", "png")


class BadSample(ValueError):
    """An unreadable sample: `reason` is one of DATA_REASONS; the message names shard, key and reason."""

    def __init__(self, shard: str, key: str, reason: str, detail: str):
        super().__init__(f"{shard}: sample {key}: {detail} ({reason})")
        self.shard, self.key, self.reason, self.detail = shard, key, reason, detail


class SkippedSampleWarning(UserWarning):
    """Emitted once per skipped bad sample (filterable apart from other warnings)."""


def warn_skipped(exc: BadSample) -> None:
    """The one line a skipped sample leaves in the log (text kept stable: tests and users grep for it)."""
    warnings.warn(f"skipping bad sample {exc.key} in {exc.shard}: {exc.reason} ({exc.detail})",
                  SkippedSampleWarning, stacklevel=2)


def check_sample(raw: dict[str, Any]) -> tuple[list[dict], list[bytes]]:
    """Validate a raw shard sample before rendering: (conversation, image bytes in index order), or BadSample.

    Cheap (a few isinstance checks per turn): it runs for every sample on the loader's hot path."""
    shard, key = raw["__url__"], raw["__key__"]
    record = raw.get("json")
    if not isinstance(record, dict) or not isinstance(record.get("conversation"), list):
        what = ("the sample has no json member" if record is None else f"json is a {type(record).__name__}"
                if not isinstance(record, dict) else "json has no 'conversation' list")
        raise BadSample(shard, key, "missing_fields", f"no json member with a conversation list: {what}")
    conversation = record["conversation"]
    marks = 0
    for i, turn in enumerate(conversation):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise BadSample(shard, key, "missing_fields", f"conversation turn {i} is not {{role: str, content: str}}")
        if turn["role"] == "user":
            marks += turn["content"].count(IMAGE_TOKEN)
    found: dict[int, bytes] = {}
    extra = []
    for name, data in raw.items():
        index, dot, ext = name.partition(".")
        if dot and ext in IMAGE_EXTS and index.isdigit():
            if int(index) in found or int(index) >= marks:
                extra.append(name)
            found[int(index)] = data
    declared = record.get("num_images")
    if extra or len(found) != marks or (declared is not None and declared != marks):
        names = ", ".join(sorted(n for n in raw if n.partition(".")[2] in IMAGE_EXTS)) or "none"
        raise BadSample(shard, key, "image_count_mismatch",
                        f"{marks} {IMAGE_TOKEN} marks, image members: {names}"
                        + (f", num_images={declared}" if declared is not None and declared != marks else ""))
    return conversation, [found[i] for i in range(marks)]


def load_image(data: bytes, cfg: ImageConfig, rng: random.Random | None, max_pixels: int, shard: str, key: str,
               index: int, out: np.ndarray | None = None) -> np.ndarray:
    """Decode + resize one image, or BadSample. The size check reads only the header (before any decode: a
    decompression bomb is refused, not allocated); the full decode happens inside, so a truncated JPEG fails here
    and not later, lazily, in someone else's code. Pillow's own bomb error / warning map to `image_too_large`.
    With `out` the pixels land in it (see `preprocess_hwc`). The usual image (a JPEG at the model size) never meets
    Pillow, so it skips the warning filter (~3 µs)."""
    try:
        array = decode_hwc(data, cfg, rng, max_pixels, out)
        if finished(array, cfg, rng):
            return finish_hwc(data, array, cfg, rng, max_pixels, out)
        with warnings.catch_warnings():  # Pillow's bomb warning becomes an error, only where Pillow runs
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return finish_hwc(data, array, cfg, rng, max_pixels, out)
    except (ImageTooLarge, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(shard, key, "image_too_large", f"image {index}: {exc}") from exc
    except Image.UnidentifiedImageError as exc:  # its message holds a memory address: keep the line stable
        raise BadSample(shard, key, "bad_image", f"image {index}: not an image format Pillow can read") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error … for broken files
        raise BadSample(shard, key, "bad_image", f"image {index}: {type(exc).__name__}: {exc}") from exc


def count(total: dict[str, int], reason: str) -> None:
    total[reason] = total.get(reason, 0) + 1


def merge_counts(states: Sequence[dict]) -> dict[str, int]:
    """Sum the per-slot skip counts (`dropped` in the cursor state)."""
    total: dict[str, int] = {}
    for state in states:
        for reason, n in state["dropped"].items():
            total[reason] = total.get(reason, 0) + n
    return total
