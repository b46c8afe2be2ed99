"""Where this rank sits on its node (local rank, ranks per node), and the opt-in worker pinning
(`LoaderConfig.pin_workers`): each DataLoader worker keeps to one core of this process's CPU set.

Why pinning: under load on the 2-vCPU VM the pinned worker ran the bench's pipeline 1.8× as fast, on a quiet VM
within the noise (docs/loader.md, "Pinning workers to cores"). Off by default, because what is safe depends on how
a node's ranks share its cores:
- the cores are taken from the *end* of the CPU set, worker w of local rank r taking the (r × workers + w)-th one,
  modulo the set. Ranks that share one CPU set (no binding) then use different cores as long as they all fit; a rank
  bound to its own set stays inside it (the offset only rotates which of its cores the worker takes). The main
  process is never pinned: its intra-op threads train on the CPU, and the scheduler moves it off a worker's core;
- with several ranks and no launcher variable naming the local rank, nothing is pinned (one warning): every rank
  would take the same core;
- a refused `sched_setaffinity` (a seccomp filter, a cpuset that changed) warns and leaves the worker unpinned.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable

LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                   "MPI_LOCALNRANKS")
"""torchrun, the deepspeed launcher, SLURM, Open MPI and MPICH / Intel MPI, in that order."""


def _env_int(names: Iterable[str]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def local_rank() -> int | None:
    """This process's rank on its node, from the launcher's environment; None when no launcher says."""
    return _env_int(LOCAL_RANK_VARS)


def local_world_size() -> int:
    """Ranks on this node, from the launcher's environment (1 when none says)."""
    return max(1, _env_int(LOCAL_SIZE_VARS) or 1)


def worker_core(allowed: Iterable[int], rank_on_node: int, workers: int, worker: int) -> int | None:
    """The core for `worker` (of `workers` per rank) of local rank `rank_on_node`, or None with a single core
    (nothing to gain: the scheduler keeps it)."""
    cores = sorted(allowed)
    if len(cores) < 2:
        return None
    return cores[-1 - (rank_on_node * workers + worker) % len(cores)]


def pin_worker(worker: int, workers: int, world_size: int = 1) -> int | None:
    """Pin the calling process (a DataLoader worker) to its core; the core, or None where nothing was done (one
    core, no `sched_setaffinity` on this platform, several ranks with no local rank known, or a refusal)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    rank_on_node = local_rank()
    if rank_on_node is None:
        if world_size > 1:
            warnings.warn(f"pin_workers: {world_size} ranks but no local rank in the environment "
                          f"({', '.join(LOCAL_RANK_VARS)}): workers are left unpinned", RuntimeWarning, stacklevel=2)
            return None
        rank_on_node = 0
    core = worker_core(os.sched_getaffinity(0), rank_on_node, workers, worker)
    if core is None:
        return None
    try:
        os.sched_setaffinity(0, {core})
    except OSError as exc:
        warnings.warn(f"pin_workers: could not pin worker {worker} to core {core} ({exc}): left unpinned",
                      RuntimeWarning, stacklevel=2)
        return None
    return core
