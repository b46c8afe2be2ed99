"""Resume with the recipe the run started with: the recipe given now is compared with the one the checkpoint saved
(`recipe.yaml`), and a change to a field that alters training stops the resume unless `--allow-recipe-change`.

The comparison is pure (`recipe_changes` over two plain mappings). A key the saved recipe lacks (a checkpoint from
before the field existed) counts as its default; a saved key under an old name is read as its new name first
(`config/renamed.py`), and one the tree no longer has at all is not compared. `FREE` lists the fields that may change freely, each with why it leaves training as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmtrain.config import Recipe, StageSpec, field_defaults, plain
from mmtrain.config.renamed import with_current_names
from mmtrain.config.show import format_value
from mmtrain.errors import UserError

FREE: dict[str, str] = {
    "name": "the recipe's label: run-report.json shows it, nothing trains on it",
    "peak_tflops": "only the MFU figure in the metrics",
    "report_to": "where the metrics are sent, not what is trained",
    "gradient_checkpointing": "recomputes the same activations in backward: memory, not results",
    "faults.on_bad_sample": "stop or skip at a bad sample: a run that goes on has read the same batches",
    "faults.max_skip_fraction": "when bad samples stop the run, not which samples are read",
    "faults.hang_timeout_s": "a watchdog's patience",
    "faults.collective_timeout_s": "how long a collective may wait before the run fails",
    "faults.on_nonfinite": "stop or skip at a non-finite step: a run that goes on has taken the same steps",
    "faults.max_nonfinite_in_row": "when non-finite steps stop the run",
    "faults.keep_last": "how many old checkpoints stay on disk",
    "stages.*.save_every": "when checkpoints are written, not what is trained",
    "stages.*.loader.transfer_samples": "how workers hand batches over; batches, order and cursor do not depend on it",
    "stages.*.loader.persistent_workers": "whether workers outlive an epoch; the batches are the same",
    "stages.*.loader.pin_workers": "which CPU core a worker runs on",
    "stages.*.loader.shard_cache": "where fetched remote shards are kept; the same bytes are read",
    "stages.*.loader.shard_retries": "how often a remote shard fetch is tried before it counts as unreachable",
    "stages.*.loader.shard_backoff": "how long a remote shard fetch waits between tries",
    "stages.*.loader.shard_timeout": "how long a remote shard fetch may stall before a try fails",
}
"""Fields that do not alter training (`*`: any one key, e.g. a stage's index); a field listed covers its subfields."""

MISSING = object()
"""A key the saved recipe does not have."""


@dataclass(frozen=True)
class Change:
    """One field that differs: its dotted path, the saved value and the value now (MISSING where absent)."""

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        def show(value: Any) -> str:
            return "(absent)" if value is MISSING else format_value(value)
        return f"{self.path}: {show(self.old)} → {show(self.new)}"


def recipe_changes(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list[Change]:
    """Every field of `current` that differs from `saved`, in `current`'s order. `defaults` mirrors `current`'s
    shape with each field's default: a key missing from `saved` counts as that default."""
    return list(_diff(saved, current, defaults, ()))


def _diff(saved: Any, current: Any, default: Any, path: tuple[str, ...]):
    if saved is MISSING:
        saved = default
    if isinstance(current, dict) and isinstance(saved, dict):
        known = isinstance(default, dict) and bool(default)  # a spec's fields, not a free-form mapping
        for key, value in current.items():
            sub_default = default.get(key, MISSING) if isinstance(default, dict) else MISSING
            yield from _diff(saved.get(key, MISSING), value, sub_default, path + (str(key),))
        if not known:  # a free-form mapping (model.config, lr_per_part): a key taken away is a change
            for key in saved.keys() - current.keys():
                yield Change(".".join(path + (str(key),)), saved[key], MISSING)
    elif isinstance(current, list) and isinstance(saved, list) and _items_are_mappings(current, saved):
        for i, (old, new) in enumerate(zip(saved, current)):
            sub_default = default[i] if isinstance(default, list) and i < len(default) else MISSING
            yield from _diff(old, new, sub_default, path + (str(i),))
        if len(saved) != len(current):
            yield Change(".".join(path), _entries(len(saved)), _entries(len(current)))
    elif saved != current:
        yield Change(".".join(path), saved, current)


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _items_are_mappings(*lists: list[Any]) -> bool:
    return all(isinstance(item, dict) for items in lists for item in items)


def is_free(path: str) -> bool:
    """Whether the field at `path` (or a field it lies under) is listed in FREE."""
    keys = path.split(".")
    for pattern in FREE:
        parts = pattern.split(".")
        if len(parts) <= len(keys) and all(p in ("*", k) for p, k in zip(parts, keys)):
            return True
    return False


def recipe_defaults(stages: int) -> dict[str, Any]:
    """Each field's default, shaped like a recipe of `stages` stages."""
    return {**field_defaults(Recipe), "stages": [field_defaults(StageSpec) for _ in range(stages)]}


def check_resume(checkpoint: Path, recipe: Recipe, allow: bool) -> list[str]:
    """Compare `recipe` with the one `checkpoint` saved. A change that alters training raises UserError naming every
    such field (old → new) unless `allow`; returns the lines to print about the changes let through."""
    saved_file = checkpoint / "recipe.yaml"
    if not saved_file.is_file():
        return [f"{checkpoint} holds no recipe.yaml: the recipe is not compared with the one the run started with"]
    saved = with_current_names(yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {})
    changes = recipe_changes(saved, plain(recipe.to_dict()), recipe_defaults(len(recipe.stages)))
    altering = [c for c in changes if not is_free(c.path)]
    if altering and not allow:
        listed = "".join(f"\n  {c}" for c in altering)
        raise UserError(f"--resume: the recipe differs from the one {saved_file} was saved with, in fields that alter "
                        f"training:{listed}\n--allow-recipe-change resumes with the new values anyway")
    lines = [f"recipe change (--allow-recipe-change): {c}" for c in altering]
    return lines + [f"recipe change that does not alter training: {c}" for c in changes if is_free(c.path)]
