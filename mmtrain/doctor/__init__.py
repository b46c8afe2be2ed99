"""Pre-flight checks of a recipe: `mmtrain doctor` prints them; the trainer runs them at start-up and refuses to
start on a FAIL. Cheap by design (seconds on CPU): configs, manifests, tar headers and a meta-device model, never
weights; DeepSpeed ops are JIT-built only with `build_ops`.

    checks = run_checks(recipe, world_size=8)
    print(format_table(checks))
    if failures(checks): raise SystemExit(2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mmtrain.config import Recipe
from mmtrain.doctor.context import Context
from mmtrain.doctor.data_checks import check_shard_count, check_shards
from mmtrain.doctor.length_checks import check_sequence_length
from mmtrain.doctor.model_checks import check_disk, check_model_paths
from mmtrain.doctor.report import Check, failures, format_table
from mmtrain.doctor.runtime_checks import (check_attention, check_deepspeed, check_device, check_ds_config,
                                           check_versions)
from mmtrain.doctor.stage_checks import check_stages
from mmtrain.doctor.tokenizer_checks import check_tokenizer, check_vocabulary
from mmtrain.train.dsconfig import resolve_precision

CHECKS: list[tuple[str, Callable[[Context], Check]]] = [
    ("shards", check_shards),
    ("shard count", check_shard_count),
    ("tokenizer", check_tokenizer),
    ("vocabulary", check_vocabulary),
    ("sequence length", check_sequence_length),
    ("model paths", check_model_paths),
    ("stages", check_stages),
    ("deepspeed config", check_ds_config),
    ("deepspeed", check_deepspeed),
    ("attention", check_attention),
    ("versions", check_versions),
    ("device & backend", check_device),
    ("disk space", check_disk),
]
"""Row order of the table; each function returns exactly one row."""


def default_device_type() -> str:
    """What the trainer trains on (train/runtime.init_distributed): cuda when torch sees a GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_checks(recipe: Recipe, world_size: int, out: Path | None = None, device_type: str | None = None,
               build_ops: bool = False) -> list[Check]:
    """Every check of `recipe` for a run on `world_size` ranks writing under `out` (default: the working
    directory). A check that crashes becomes a FAIL row naming the exception rather than hiding the others."""
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    device_type = device_type or default_device_type()
    ctx = Context(recipe, world_size, device_type, resolve_precision(recipe.precision, device_type),
                  Path(out) if out is not None else Path.cwd(), build_ops)
    checks = []
    for name, check in CHECKS:
        try:
            checks.append(check(ctx))
        except Exception as exc:  # noqa: BLE001 — one broken check must not hide the rest of the table
            checks.append(Check(name, "FAIL", f"the check itself failed: {type(exc).__name__}: {exc}"))
    return checks


__all__ = ["Check", "failures", "format_table", "run_checks"]


def preflight(recipe: Recipe, world_size: int, out: Path, device_type: str) -> tuple[bool, str]:
    """The trainer's start-up check (`RunOptions.preflight`): whether a row FAILs, and the table when any row is
    not PASS (empty otherwise)."""
    checks = run_checks(recipe, world_size, out, device_type)
    table = format_table(checks) if any(c.status != "PASS" for c in checks) else ""
    return bool(failures(checks)), table
