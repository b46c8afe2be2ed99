"""Model FLOPs per step and MFU, by the convention the field reports (PaLM appendix B, Megatron):

  LLM, per token of a sample of length S:  c·N + a·L·h·S
    N: matmul weights (attention, MLP, lm_head; no embeddings), L layers, h hidden size;
    c = 6 when the LLM trains, 4 when it is frozen but gradients flow through it (LoRA, or a trainable vision
    tower / connector below it): no weight gradients for frozen matmuls; a = 12 (attention has no weights, so its
    backward is whole). LoRA weights add 6 per parameter per token.
  vision tower and connector, per image: their forward FLOPs (counted once per stage with torch's FlopCounterMode on
    the meta device, attention included) × 3 when they train, × 2 when frozen below something that trains (input
    gradients only), × 1 when nothing below them needs a gradient.

MFU = achieved FLOP/s per device / the device's peak (dense bf16 by default; table below, or `peak_tflops` in the
recipe). FLOPs the hardware spends on recomputation (gradient checkpointing) do not count: this is *model* FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmtrain.model.vlm import VisionLanguageModel

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # dense tensor-core peaks from the vendors' data sheets (no sparsity); matched by substring of the device name
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}
"""fp32 means TF32 tensor cores where the device has them."""


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for this precision, or None when unknown (CPUs: set `peak_tflops` to get an MFU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name and peaks.get(precision):
            return peaks[precision] * 1e12
    return None


def linear_weights(module: nn.Module) -> tuple[int, int]:
    """(base matmul weights, LoRA matmul weights) of the Linear layers under `module`, from their shapes (so a ZeRO-3
    partitioned or meta model counts the same)."""
    base = lora = 0
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            n = sub.in_features * sub.out_features
            if "lora_" in name:
                lora += n
            else:
                base += n
    return base, lora


def forward_flops_per_image(config) -> tuple[float, float]:
    """Forward FLOPs of the vision tower and of the connector for one image, counted on the meta device."""
    with torch.device("meta"):
        model = VisionLanguageModel.from_config(config, pretrained=False)
        size = int(config.vision_config.get("image_size", 224))
        pixels = torch.zeros(1, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            features = model.vision(pixels)
        vision = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.connector(features)
        connector = counter.get_total_flops()
    return float(vision), float(connector)


@dataclass(frozen=True)
class FlopModel:
    llm_weights: int
    llm_lora_weights: int
    layers: int
    hidden: int
    llm_factor: int
    vision_per_image: float
    vision_factor: float
    connector_per_image: float
    connector_factor: float

    def llm_flops(self, tokens: int, squared_lengths: int) -> float:
        """Σ over samples of S·(c·N + 6·N_lora) + 12·L·h·S², given Σ S and Σ S²."""
        return (tokens * (self.llm_factor * self.llm_weights + 6 * self.llm_lora_weights)
                + 12 * self.layers * self.hidden * squared_lengths)

    def step_flops(self, tokens: int, squared_lengths: int, images: int) -> float:
        return (self.llm_flops(tokens, squared_lengths)
                + images * (self.vision_per_image * self.vision_factor
                            + self.connector_per_image * self.connector_factor))


def stage_flop_model(model: nn.Module, config, vision: bool | int, connector: bool, llm: str) -> FlopModel:
    """The FLOP model of one stage's freezing: `vision` True / False / N last layers, `connector`, `llm`."""
    text = config.text_config
    base, lora = linear_weights(model.llm)
    vision_fwd, connector_fwd = forward_flops_per_image(config)
    layers = int(config.vision_config.get("num_hidden_layers", 1))
    if vision is True:
        vision_factor = 3.0
    elif vision:  # the last N layers train: those cost 3×, the ones below run forward only
        vision_factor = 1.0 + 2.0 * min(int(vision), layers) / layers
    else:
        vision_factor = 1.0
    below_trains = bool(vision)
    connector_factor = 3.0 if connector else (2.0 if below_trains else 1.0)
    return FlopModel(llm_weights=base, llm_lora_weights=lora, layers=int(text["num_hidden_layers"]),
                     hidden=int(text["hidden_size"]), llm_factor=6 if llm == "full" else 4,
                     vision_per_image=vision_fwd, vision_factor=vision_factor,
                     connector_per_image=connector_fwd, connector_factor=connector_factor)


def batch_lengths(batch: dict) -> tuple[int, int]:
    """(Σ S, Σ S²) over the batch's samples: rows of a padded batch, segments of a packed one."""
    segments = batch.get("segment_ids")
    if segments is not None:  # packed: 1, 2, … per sample, 0 = padding
        lengths = torch.cat([torch.bincount(row[row > 0].to(torch.int64)) for row in segments])
    else:
        mask = batch["attention_mask"]
        rows, width = batch["input_ids"].shape
        lengths = mask.sum(1) if mask.dim() == 2 else torch.full((rows,), width)
    lengths = lengths.to(torch.int64)
    return int(lengths.sum()), int((lengths * lengths).sum())
