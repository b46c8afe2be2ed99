"""SIGTERM / SIGUSR1 → a flag the training loop reads; installed first thing, before anything slow is imported.

SLURM sends USR1 (`--signal=USR1@120`) or TERM (preemption, time limit) to every process of the job step. A notice
that arrives while a rank is still importing deepspeed, joining the process group or building the model must not be
lost (nor kill the rank): the loop then saves at the end of its first step. No torch here: importing this is instant.
"""

from __future__ import annotations

import signal
from typing import Any

requested = False


def _handle(signum: int, frame: Any) -> None:
    global requested
    requested = True


def install() -> None:
    """Route SIGTERM and SIGUSR1 to the flag (idempotent)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handle)
