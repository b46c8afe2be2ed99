"""Opt-in (`LoaderConfig.pin_workers`): each DataLoader worker keeps to one core of this process's CPU set.

Why: on the 2-vCPU VM the pinned worker ran the bench's pipeline ~10 % faster (docs/loader.md, "Pinning"): the
scheduler no longer moves it, or wakes the main process on its core. Off by default, because what is safe depends on
how a node's ranks share its cores:
- the cores are taken from the *end* of the CPU set, so the main process (left free: its intra-op threads train on
  the CPU) keeps the low cores, which are the ones most launchers and `taskset` hand out first;
- worker w of local rank r takes the (r × workers + w)-th core from the end, modulo the set. Ranks that share one CPU
  set (no binding) then use different cores as long as they all fit, and a rank bound to its own set stays inside
  it (`LOCAL_RANK`, else `SLURM_LOCALID`, else 0).
"""

from __future__ import annotations

import os
from typing import Iterable


def local_rank() -> int:
    """This process's rank on its node, as torchrun / deepspeed (`LOCAL_RANK`) or SLURM (`SLURM_LOCALID`) set it."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def worker_core(allowed: Iterable[int], rank_on_node: int, workers: int, worker: int) -> int | None:
    """The core for `worker` (of `workers` per rank) of local rank `rank_on_node`, or None with a single core
    (nothing to gain: the scheduler keeps it)."""
    cores = sorted(allowed)
    if len(cores) < 2:
        return None
    return cores[-1 - (rank_on_node * workers + worker) % len(cores)]


def pin_worker(worker: int, workers: int) -> int | None:
    """Pin the calling process (a DataLoader worker) to its core; the core, or None where nothing was done (one
    core, or no `sched_setaffinity` on this platform)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = worker_core(os.sched_getaffinity(0), local_rank(), workers, worker)
    if core is not None:
        os.sched_setaffinity(0, {core})
    return core
