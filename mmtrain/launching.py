"""Start `mmtrain.train` on N local ranks through the DeepSpeed launcher, or torchrun (used by the demo, tests and
benches). `MMTRAIN_LAUNCHER=torchrun` picks torchrun where no launcher is named: the trainer reads the same
RANK / LOCAL_RANK / WORLD_SIZE either way, and torchrun starts in 1.9 s where the DeepSpeed launcher's two extra
Python processes take 5.5 s (2 CPU ranks, a script that only prints), which the test suite pays once per run."""

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


def torchrun_command(ranks: int, module_args: Sequence[str], module: str = "mmtrain.train",
                     port: int | None = None) -> list[str]:
    """`torchrun --nproc-per-node N [-m] M ARGS` on this node."""
    target = [module] if module.endswith(".py") else ["-m", module]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(port or free_port()), *target, *module_args]


LAUNCHERS = {"deepspeed": deepspeed_command, "torchrun": torchrun_command}


def run_ranks(ranks: int, module_args: Sequence[str], log: Path | None = None, timeout: float | None = None,
              module: str = "mmtrain.train", launcher: str | None = None) -> subprocess.CompletedProcess:
    """Run the launcher to completion; output goes to `log` when given (else inherited). `launcher`: deepspeed or
    torchrun; default `MMTRAIN_LAUNCHER`, else deepspeed."""
    name = launcher or os.environ.get("MMTRAIN_LAUNCHER", "deepspeed")
    if name not in LAUNCHERS:
        raise ValueError(f"launcher {name!r}: expected one of {', '.join(LAUNCHERS)} (MMTRAIN_LAUNCHER)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = LAUNCHERS[name](ranks, module_args, module)
    if log is None:
        return subprocess.run(command, env=env, timeout=timeout, check=False)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        return subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False)
