"""Run metrics on rank 0: a tqdm bar (loss, lr, samples/s, tokens/s), tensorboard scalars and `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    """Writes only on rank 0; other ranks get a logger whose methods do nothing."""

    def __init__(self, out: Path, rank: int, enabled_tensorboard: bool = True) -> None:
        self.active = rank == 0
        self._out = out
        self._bar: tqdm | None = None
        self._tb = None
        self._jsonl = None
        if self.active:
            out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
            if enabled_tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # lazy: ~0.2 s, only for runs that log to it

                self._tb = SummaryWriter(str(out / "tensorboard"))

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
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "stage_index"):
                    self._tb.add_scalar(f"{record['stage']}/{key}", value, global_step)
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
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
