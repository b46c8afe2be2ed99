"""Start `mmtrain.train` on N local ranks through the DeepSpeed launcher (used by the demo, tests and benches)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(ranks: int, module_args: Sequence[str], module: str = "mmtrain.train",
                      port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus N --module M ARGS` (or a script path for M): without GPUs, N CPU ranks (gloo)."""
    target = [module] if module.endswith(".py") else ["--module", module]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port or free_port()), *target, *module_args]


def run_ranks(ranks: int, module_args: Sequence[str], log: Path | None = None, timeout: float | None = None,
              module: str = "mmtrain.train") -> subprocess.CompletedProcess:
    """Run the launcher to completion; output goes to `log` when given (else inherited)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = deepspeed_command(ranks, module_args, module)
    if log is None:
        return subprocess.run(command, env=env, timeout=timeout, check=False)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        return subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False)
