"""What the GPU check's steps share: the scales (GPU and CPU rehearsal), the owl-7b overrides, the synthetic packed
batches, the device peak, and printing / writing results."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OWL_RECIPE = REPO / "launch" / "recipes" / "owl-7b.yaml"
STAGE_INDEX = {"stage2": 1, "stage1": 0}
"""Which stage of owl-7b.yaml each measurement runs: stage 2 is `instruct`, stage 1 is `pretrain`."""
MODES = {"stage2": ("zero2", "plain", "zero3"), "stage1": ("zero2",)}
"""Run order: the target's pair first, ZeRO-3 (whose hooks are the most invasive) last."""
MODE_LABELS = {"zero2": "mmtrain engine, ZeRO-2", "zero3": "mmtrain engine, ZeRO-3", "plain": "plain HF + peft loop"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The plain loop's peft targets: roles self_attn + ffn of a LLaMA (what mmtrain's lora.py adapts for them)."""
TARGETS = {"stage2": (("ratio", "zero2", 1.35), ("mfu", "zero2", 0.51)), "stage1": (("mfu", "zero2", 0.40),)}
"""(what, mode, at least): ratio = the mode's tokens/s over the plain loop's; mfu = model FLOPs utilization."""
IMAGE_SHARE = 0.5
"""Share of the synthetic documents that hold one image."""


@dataclass(frozen=True)
class Scale:
    """The sizes of one run of the check: the GPU's, or the CPU rehearsal's (same code, tiny shapes)."""

    name: str
    device: str
    precision: str
    preset: str
    rows: int
    length: int
    doc_min: int
    doc_max: int
    warmup: int
    timed: int
    smoke_steps: int
    peak_tflops: float | None
    """None: the device's dense peak from mmtrain/train/flops.py; the rehearsal's is nominal."""


GPU = Scale("gpu", "cuda", "bf16", "owl-7b", rows=4, length=2048, doc_min=160, doc_max=640, warmup=3, timed=6,
            smoke_steps=24, peak_tflops=None)
REHEARSAL = Scale("cpu-rehearsal", "cpu", "fp32", "tiny", rows=2, length=384, doc_min=96, doc_max=192, warmup=1,
                  timed=2, smoke_steps=3, peak_tflops=1.0)


def scale_of(rehearsal: bool) -> Scale:
    return REHEARSAL if rehearsal else GPU


def say(*parts: Any) -> None:
    """Print at once: the shell shows a step's output only after it, but a timeout must not swallow it."""
    print(*parts, flush=True)


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


# ---- what every mode shares ------------------------------------------------------------------------------------------
def owl_overrides(scale: Scale, which: str, zero: int) -> list[str]:
    """`--set` lines turning owl-7b.yaml into the measured stage: random weights (no checkpoint paths), no gradient
    checkpointing (MFU counts model FLOPs), packed rows of the scale's shape, one micro-batch per optimizer step."""
    s = f"stages.{STAGE_INDEX[which]}"
    return [f"model.preset={scale.preset}", "model.vision_path=null", "model.llm_path=null",
            f"precision={scale.precision}", "attention=auto", "gradient_checkpointing=false",
            f"{s}.micro_batch={scale.rows}", f"{s}.grad_accum=1", f"{s}.max_length={scale.length}", f"{s}.pack=true",
            f"{s}.steps={scale.warmup + scale.timed}", f"{s}.deepspeed=ds_configs/zero{zero}.json"]


def owl_recipe(scale: Scale, which: str, zero: int):
    from mmtrain.config import load_recipe

    return load_recipe(OWL_RECIPE, owl_overrides(scale, which, zero))


def synthetic_batches(config, scale: Scale, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` packed batches as the loader makes them (`pack_arrays`): `rows` full rows of `length` tokens, documents
    of doc_min..doc_max tokens (the last of a row takes what is left), positions restarting per document, some with
    one image whose placeholder run sits after a short prompt; uint8 pixels + `pixel_norm`, as the loader sends."""
    import numpy as np
    import torch

    from mmtrain.data.loader.collate import Example, pack_arrays, to_torch
    from mmtrain.data.loader.images import CLIP_MEAN, CLIP_STD
    from mmtrain.data.loader.templates import IGNORE_INDEX

    rng = np.random.default_rng(seed)
    slots, size = config.num_image_slots(), int(config.vision_config["image_size"])
    top = min(int(config.text_config["vocab_size"]), config.image_token_id)  # text ids never hit the placeholder
    batches = []
    for b in range(count):
        examples, rows = [], []
        for r in range(scale.rows):
            row, left = [], scale.length
            while left > 0:
                n = int(rng.integers(scale.doc_min, scale.doc_max + 1))
                n = left if left - n < scale.doc_min else n
                ids = rng.integers(3, top, n).tolist()
                labels = list(ids)
                starts, pixels = [], None
                if (not row and r == 0 or rng.random() < IMAGE_SHARE) and n >= slots + 24:  # >= 1 image a batch
                    start = int(rng.integers(1, 9))
                    ids[start:start + slots] = [config.image_token_id] * slots
                    labels[:start + slots] = [IGNORE_INDEX] * (start + slots)
                    starts = [start]
                    pixels = torch.from_numpy(rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8))
                row.append(len(examples))
                examples.append(Example(ids, labels, starts, pixels, key=f"b{b}r{r}d{len(row)}"))
                left -= n
            rows.append(row)
        batch = to_torch(pack_arrays(examples, 0, (3, size, size), scale.length, rows=rows))
        batch["pixel_norm"] = (CLIP_MEAN, CLIP_STD)
        batches.append(batch)
    return batches


def batch_facts(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Shape, real tokens, documents and images of each batch, for the reports."""
    return {"count": len(batches), "rows": int(batches[0]["input_ids"].shape[0]),
            "length": int(batches[0]["input_ids"].shape[1]),
            "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
            "documents_per_batch": [int(b["segment_ids"].max(dim=1).values.sum()) for b in batches],
            "images_per_batch": [int(b["pixel_values"].shape[0]) for b in batches]}


def peak_of(device, scale: Scale) -> tuple[float | None, str]:
    """Peak FLOP/s of the device (mmtrain/train/flops.py) and where it comes from."""
    import torch

    from mmtrain.train.flops import PEAK_TFLOPS, peak_flops

    peak = peak_flops(device, scale.precision, scale.peak_tflops)
    if scale.peak_tflops:
        return peak, f"nominal {scale.peak_tflops:g} TFLOP/s (CPU rehearsal: MFU is not meaningful)"
    if device.type != "cuda":
        return None, "none (not a CUDA device)"
    name = torch.cuda.get_device_name(device)
    key = next((k for k in PEAK_TFLOPS if k in name), None)
    if peak is None:
        return None, f"{name}: not in PEAK_TFLOPS (mmtrain/train/flops.py): no MFU"
    return peak, f"{name}: {key} {scale.precision} dense {peak / 1e12:.1f} TFLOP/s (flops.py PEAK_TFLOPS)"


# ---- one mode ------------------------------------------------------------------------------------------------------
