"""`python -m mmtrain.train` with one fault planted, for the fault tests: MMTRAIN_TEST_FAULT=KIND:RANKS:STEP.

KIND: `kill_in_save` (the rank SIGKILLs itself after DeepSpeed wrote its files, before the rest of the save),
`write_error` (the save raises ENOSPC), `nan` (the STEP-th micro-batch's pixels are NaN). RANKS: comma-separated.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from mmtrain.train import preemption

preemption.install()

import torch  # noqa: E402

import mmtrain.train.checkpoint as ckpt  # noqa: E402
import mmtrain.train.stepping as stepping  # noqa: E402
from mmtrain.train.entry import main  # noqa: E402


def plant(kind: str, ranks: set[int], step: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank not in ranks:
        return
    if kind in ("kill_in_save", "write_error"):
        original = ckpt.write_rank_state

        def write_rank_state(folder, r, cursor):
            if folder.name.endswith(f"step{step:07d}"):
                if kind == "kill_in_save":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"rank-{r}.json"))
            original(folder, r, cursor)

        ckpt.write_rank_state = write_rank_state
    elif kind == "nan":
        original_inputs = stepping.model_inputs
        calls = [0]

        def model_inputs(batch, device, dtype):
            out = original_inputs(batch, device, dtype)
            calls[0] += 1
            if calls[0] == step:
                out["pixel_values"] = torch.full_like(out["pixel_values"], float("nan"))
            return out

        stepping.model_inputs = model_inputs
    else:
        raise SystemExit(f"unknown fault {kind!r}")


if __name__ == "__main__":
    kind, ranks, step = os.environ["MMTRAIN_TEST_FAULT"].split(":")
    plant(kind, {int(r) for r in ranks.split(",")}, int(step))
    sys.exit(main())
