"""Run metrics on rank 0: a tqdm bar (loss, lr, samples/s, tokens/s), `metrics.jsonl`, and the recipe's trackers
(`report_to`: tensorboard, wandb, mlflow; trackers.py), which all get the same scalars under the same names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from mmtrain.config import Recipe
from mmtrain.train.trackers import Tracker, open_trackers, require

NOT_SCALARS = ("step", "stage_index")
"""Numeric record fields that are coordinates, not series (the step is the trackers' x axis)."""


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as the trackers' series: `<stage>/<key>` (booleans, None, mappings and strings left out)."""
    return {f"{record['stage']}/{key}": value for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_SCALARS}


def metrics_logger(recipe: Recipe, out: Path, rank: int, tensorboard: bool = True) -> MetricsLogger:
    """The run's logger in `out`: the recipe's trackers (tensorboard left out where `tensorboard` is false: the run
    options turn it off), the recipe as the trackers' config."""
    report_to = [name for name in recipe.report_to if name != "tensorboard" or tensorboard]
    return MetricsLogger(out, rank, report_to, recipe.to_dict())


class MetricsLogger:
    """Writes only on rank 0; other ranks get a logger whose methods do nothing. Every rank checks that the named
    trackers can be imported, so a missing extra stops the run before anything is built."""

    def __init__(self, out: Path, rank: int, report_to: Sequence[str] = ("tensorboard",),
                 config: dict[str, Any] | None = None) -> None:
        require(tuple(report_to))
        self.active = rank == 0
        self._out = out
        self._bar: tqdm | None = None
        self._jsonl = None
        self._stage: str | None = None
        self.trackers: list[Tracker] = []
        if self.active:
            out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
            self.trackers = open_trackers(tuple(report_to), out, config or {})

    def start_stage(self, name: str, total: int, initial: int) -> None:
        if self.active:
            self.close_bar()
            self._bar = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)

    def stage_event(self, record: dict[str, Any]) -> None:
        """One line per stage start (or resume) in `stages.jsonl`: trainable counts by part, ZeRO stage, precision."""
        if self.active:
            with open(self._out / "stages.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def log(self, record: dict[str, Any], global_step: int) -> None:
        if not self.active:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if record["stage"] != self._stage:
            self._stage = record["stage"]
            for tracker in self.trackers:
                tracker.stage(self._stage)
        scalars = scalars_of(record)
        for tracker in self.trackers:
            tracker.log(scalars, global_step)
        if self._bar is not None:
            self._bar.update(1)
            extra = {"mfu": f"{record['mfu']:.1%}"} if record.get("mfu") is not None else {}
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  samples_s=f"{record['samples_per_s']:.1f}", tokens_s=f"{record['tokens_per_s']:.0f}",
                                  **extra)

    def print(self, text: str) -> None:
        if self.active:
            (self._bar.write if self._bar is not None else print)(text)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
