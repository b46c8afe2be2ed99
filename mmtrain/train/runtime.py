"""The per-rank runtime around the engine: joining the process group, moving a batch to the device, and what
the heartbeat records of a batch. Plain functions, so probes and tests can call them without a Trainer."""

from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import deepspeed
import torch
import torch.distributed as dist

from mmtrain.data.loader.images import normalize_pixels

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_slots", "position_ids", "segment_ids")


def quiet_libraries() -> None:
    """DeepSpeed's INFO lines and torch's deprecation notices from inside DeepSpeed drown the progress bar."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up (deepspeed, torchrun or srun); a plain run is world size 1.
    `timeout_s` bounds every collective (a dead peer then raises instead of blocking forever)."""
    quiet_libraries()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun without a launcher
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", **timeout)
    if not cuda:
        if dist.get_world_size() > 1:
            dist.barrier()  # every rank has mapped every other rank's shared-memory buffer by now
        unlink_shm_buffer(dist.get_rank())
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def unlink_shm_buffer(rank: int) -> list[Path]:
    """Remove this rank's name for DeepSpeed's CPU shared-memory all-reduce buffer (`/dev/shm`, 69 MB a rank).

    DeepSpeed creates it at `init_distributed` on CPU and never unlinks it, so every CPU run (a test, the demo)
    would leave 69 MB per rank of RAM-backed /dev/shm behind, until the machine runs out of memory. Once every rank
    has mapped it (the barrier before this call) the name can go: the mappings stay valid, and the memory is freed
    when the last rank exits, however it exits."""
    port = os.environ.get("MASTER_PORT", "")
    removed = []
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def forever(loader) -> Iterator[dict]:
    while True:
        yield from loader


def model_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A loader batch → the model's keyword arguments on `device`. The loader's pixels are uint8: they cross to
    the device as they are (4× fewer bytes than float) and are normalized there with the batch's `pixel_norm`
    (mean, std), then cast to `dtype`; the model gets exactly the values a host-side normalization gives."""
    inputs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    out = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in out:
        pixels = out["pixel_values"]
        if pixels.dtype == torch.uint8:
            if batch.get("pixel_norm") is None:
                raise ValueError("uint8 pixel_values need the batch's pixel_norm (mean, std) to be normalized")

            pixels = normalize_pixels(pixels, *batch["pixel_norm"])
        out["pixel_values"] = pixels.to(dtype)
    return out


def batch_composition(batch: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What the heartbeat records of the batch a rank is working on: the first thing to look at in a hang."""
    filler = batch.get("filler")
    rows = int(batch["input_ids"].shape[0]) if filler is None else int((~filler).sum())
    slots = batch.get("image_slots")
    with_images = len(set(slots[:, 0].tolist())) if slots is not None and len(slots) else 0
    mask = batch["attention_mask"]
    return {"image_samples": with_images, "text_samples": rows - with_images,
            "tokens": int(mask.sum()) if mask.dim() == 2 else int(batch["input_ids"].numel()),
            "wall_s": round(wall_s, 3)}
