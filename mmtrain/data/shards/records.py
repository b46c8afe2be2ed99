"""The record types every data module shares (docs/architecture.md, "One record type flows from catalog to loader")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Reasons an input row or image is rejected; the builder's summary and rejects.jsonl count by these names.
MALFORMED_ROW = "malformed_row"
NOT_UTF8 = "not_utf8"
MISSING_FIELD = "missing_field"
DUPLICATE_ID = "duplicate_id"
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "bad_image"
IMAGE_TOO_LARGE = "image_too_large"


@dataclass(frozen=True)
class Sample:
    """One training conversation. `<image>` marks in user turns say where each of its `num_images` images goes."""

    key: str
    conversation: list[dict[str, str]]
    task: str
    source: str
    product_id: str | None
    num_images: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "conversation": self.conversation, "task": self.task, "source": self.source,
                "product_id": self.product_id, "num_images": self.num_images}


@dataclass(frozen=True)
class Reject:
    """An input row (or its image) that could not be used, and why. Written to `rejects.jsonl`."""

    row: int | None
    product_id: str | None
    reason: str
    detail: str
    file: str

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "product_id": self.product_id, "reason": self.reason, "detail": self.detail,
                "file": self.file}


@dataclass(frozen=True)
class WorkItem:
    """The unit a build worker handles: images shared by some samples (one product, or one open-domain record).

    `split_id` decides train/val by hash, so all samples of one product land on the same side.
    """

    split_id: str
    image_paths: tuple[Path, ...]
    samples: tuple[Sample, ...]
    row: int | None
    file: str
