"""What every part of a run shares on this rank: the recipe and options, the process group, the model config, the
tokenizer, and where the run writes. Built once by the Trainer; stage setup, stepping and saving read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mmtrain.config import Recipe, StageSpec
from mmtrain.data.loader.images import ImageConfig
from mmtrain.model import VLMConfig
from mmtrain.train.flops import FlopModel
from mmtrain.train.heartbeat import Heartbeat
from mmtrain.train.logging import MetricsLogger

Preflight = Callable[[Recipe, int, Path, str], tuple[bool, str]]
"""(recipe, world size, run directory, device type) → (any check failed, the table to print)."""


@dataclass
class RunOptions:
    """How this invocation runs the recipe (the command line's flags)."""

    out: Path
    """The run directory: checkpoints/, stages/, metrics.jsonl, tensorboard/."""
    resume: bool = False
    """Continue from the latest complete checkpoint under `out` (a fresh start when there is none)."""
    allow_recipe_change: bool = False
    """On resume, accept a recipe whose training fields differ from the checkpoint's recipe.yaml (recipe_change.py)."""
    start_stage: str | None = None
    """Start at this stage; its starting weights come from `init_from` (or this run's earlier stage)."""
    init_from: Path | None = None
    """A run directory whose `stages/<previous stage>` holds the weights to start `start_stage` from."""
    stop_after_steps: int | None = None
    """Testing aid: stop (without a final save) after this many optimizer steps in this process."""
    tensorboard: bool = True
    """Write tensorboard event files beside metrics.jsonl."""
    preflight: Preflight | None = None
    """Checks run on the first rank of every node before anything is built (the rank entry point passes
    `mmtrain.doctor.preflight`); any failure stops every rank."""


@dataclass
class StageResult:
    """What one stage did in this process, summed over all ranks."""

    name: str
    trainable: dict[str, int]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_read: int = 0
    """Raw samples read from the shards by all ranks (delivered + skipped), over the whole stage."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped by all ranks, by reason, over the whole stage (a resume continues the counts)."""
    nonfinite_steps: list[int] = field(default_factory=list)


@dataclass
class StageEngine:
    """One stage's DeepSpeed engine and loader, and where it stands."""

    engine: Any
    loader: Any
    stage: StageSpec
    index: int
    step: int
    trainable: dict[str, int]
    group_names: list[str]
    zero_stage: int
    nonfinite_steps: list[int] = field(default_factory=list)
    flops: FlopModel | None = None
    attention: str = "sdpa"


@dataclass
class RunContext:
    """This rank's view of the run."""

    recipe: Recipe
    options: RunOptions
    rank: int
    world_size: int
    device: torch.device
    precision: str
    dtype: torch.dtype
    peak: float | None
    """Peak FLOP/s of one device for MFU (None where unknown, e.g. a CPU)."""
    tokenizer: Any
    config: VLMConfig
    image_config: ImageConfig
    heartbeat: Heartbeat
    metrics: MetricsLogger
    steps_this_process: int = 0

    @property
    def out(self) -> Path:
        return self.options.out

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def stage_dir(self, stage: StageSpec, root: Path | None = None) -> Path:
        return (root or self.out) / "stages" / stage.name

    def image_config_json(self) -> dict[str, Any]:
        return {**self.image_config.__dict__, "mean": list(self.image_config.mean), "std": list(self.image_config.std)}
