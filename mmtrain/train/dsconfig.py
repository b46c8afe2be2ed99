"""DeepSpeed configs: `ds_configs/*.json` hold ZeRO / offload knobs; batch sizes, clipping and precision come from the
recipe. DeepSpeed itself does not resolve "auto" (transformers' Trainer does), so we fill it here and check that any
explicit value agrees with the recipe rather than silently training with another batch size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmtrain.config import StageSpec
from mmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def resolve_precision(precision: str, device_type: str) -> str:
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def _fill(config: dict[str, Any], key: str, value: Any, source: str) -> None:
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value:
        raise UserError(f"{source}: {key} is {current!r} but the recipe gives {value!r}; set it to \"auto\"")


def deepspeed_config(stage: StageSpec, world_size: int, precision: str) -> dict[str, Any]:
    """The stage's DeepSpeed config with every "auto" filled; `precision` is already resolved (fp32 | bf16 | fp16)."""
    path = Path(stage.deepspeed)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read DeepSpeed config {path}: {exc}") from exc
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise UserError(f"{path}: remove the {owned!r} block; the recipe's stage defines the {owned}")
    source = str(path)
    _fill(config, "train_micro_batch_size_per_gpu", stage.micro_batch, source)
    _fill(config, "gradient_accumulation_steps", stage.grad_accum, source)
    _fill(config, "train_batch_size", stage.global_batch(world_size), source)
    _fill(config, "gradient_clipping", stage.optimizer.grad_clip, source)
    for kind in ("bf16", "fp16"):
        block = config.setdefault(kind, {})
        _fill(block, "enabled", precision == kind, f"{source} {kind}")
    if precision == "bf16":  # a NaN/Inf gradient then skips the step, as it does in fp32 and fp16 (train/guards.py)
        config["bf16"].setdefault("check_grad_overflow", True)
    config.setdefault("zero_optimization", {}).setdefault("stage", 0)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
