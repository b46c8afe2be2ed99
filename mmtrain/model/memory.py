"""Per-GPU memory of one training stage, from configs alone: model states under ZeRO, activations, logits.

What a user asks before a job: will stage K of this preset fit on N GPUs at this micro-batch and length? The model is
built on the meta device and the stage's freezing applied, so trainable counts are exact; the rest is arithmetic:

  weights      2 B × parameters (bf16), ÷ N under ZeRO-3, + the gathered working set (2 × the largest module, 2 B)
  master+Adam  (4 + 8) B × trainable, ÷ N under ZeRO-1/2/3
  gradients    2 B × trainable (÷ N under ZeRO-2/3) + 4 B × trainable ÷ N (fp32 partition under ZeRO), + the reduce
               bucket (2 B × reduce_bucket_size)
  activations  kept for backward, per token and decoder layer (bf16, flash/SDPA attention, nothing of size S²):
               LLaMA-style 2·(6h + 2·kv) + 6·i bytes (norm inputs/outputs, q k v, attention output, gate, up, act·up);
               a ViT layer 2·(6h) + 4·i per patch token; a frozen part nothing upstream of which trains keeps none.
               With gradient checkpointing a part keeps only each layer's input (2h per token) + one layer's worth.
  logits       10 B × tokens × vocabulary (bf16 logits, their fp32 copy for the loss, the fp32 gradient); 0 with a
               fused linear cross-entropy (liger-kernel)
Not counted: the CUDA context and allocator fragmentation (typically 1–3 GiB), DeepSpeed's prefetch beyond the
largest module. Checked against measured peaks only on a GPU; CPU tests check the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmtrain.model.config import VLMConfig
from mmtrain.model.lora import apply_stage_policy, parameter_counts
from mmtrain.model.vlm import VisionLanguageModel

GIB = 2**30


@dataclass
class StageShape:
    gpus: int = 8
    zero_stage: int = 3
    micro_batch: int = 4
    seq_len: int = 2048
    images_per_sample: float = 1.0
    checkpointing: dict[str, bool] = field(default_factory=dict)
    """Gradient checkpointing per part: {"vision": bool, "llm": bool}."""
    fused_cross_entropy: bool = False
    reduce_bucket_size: int = 50_000_000


@dataclass
class MemoryEstimate:
    parts: dict[str, float]
    """Bytes per GPU by component."""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self) -> str:
        rows = [f"  {name:<26} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        return "\n".join(rows + [f"  {'total':<26} {self.total / GIB:8.2f} GiB"])


def _layer_activation_bytes(hidden: int, intermediate: int, kv: int, decoder: bool) -> int:
    """Bytes kept per token per layer for backward (bf16, flash attention)."""
    if decoder:
        return 2 * (6 * hidden + 2 * kv) + 6 * intermediate
    return 2 * (6 * hidden) + 4 * intermediate


def estimate(config: VLMConfig, counts: dict[str, int], trainable: dict[str, int], largest_module: int,
             stage_flows: dict[str, bool], shape: StageShape) -> MemoryEstimate:
    """Memory per GPU. `counts`/`trainable`: parameters per part (vision, connector, llm) and `total`;
    `stage_flows[part]`: whether a gradient flows through the part (it trains, or something below it trains)."""
    n, z = shape.gpus, shape.zero_stage
    total, train = counts["total"], sum(trainable.get(p, 0) for p in ("vision", "connector", "llm"))
    parts: dict[str, float] = {}
    parts["weights (bf16)"] = 2 * total / (n if z == 3 else 1) + (2 * 2 * largest_module if z == 3 else 0)
    parts["fp32 master + Adam"] = 12 * train / (n if z >= 1 else 1)
    parts["gradients"] = (2 * train / (n if z >= 2 else 1) + (4 * train / n if z >= 1 else 0)
                          + 2 * min(shape.reduce_bucket_size, max(train, 1)))
    text, vision = config.text_config, config.vision_config
    tokens = shape.micro_batch * shape.seq_len
    h, i, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = h // text["num_attention_heads"] * text.get("num_key_value_heads", text["num_attention_heads"])
    per_layer = _layer_activation_bytes(h, i, kv, decoder=True)
    if stage_flows.get("llm", True):
        kept = (2 * h * layers + per_layer) if shape.checkpointing.get("llm") else per_layer * layers
        parts["activations: llm"] = tokens * kept
    patches = (vision.get("image_size", 224) // vision.get("patch_size", 14)) ** 2 + 1
    vision_tokens = shape.micro_batch * shape.images_per_sample * patches
    if stage_flows.get("vision", False):
        vh, vi, vl = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
        v_layer = _layer_activation_bytes(vh, vi, vh, decoder=False)
        kept = (2 * vh * vl + v_layer) if shape.checkpointing.get("vision") else v_layer * vl
        parts["activations: vision"] = vision_tokens * kept
    parts["logits + loss"] = 0 if shape.fused_cross_entropy else 10 * tokens * text["vocab_size"]
    return MemoryEstimate(parts)


def stage_estimate(config: VLMConfig, vision: bool | int, connector: bool, llm: str, lora_roles: list[str],
                   r: int, shape: StageShape) -> MemoryEstimate:
    """Build on the meta device, apply the stage's freezing, count, estimate."""
    with torch.device("meta"):
        model = VisionLanguageModel.from_config(config, pretrained=False)
        counts = parameter_counts(model)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        trainable = apply_stage_policy(model, vision=vision, connector=connector, llm=llm, lora_roles=lora_roles,
                                       r=r)
    flows = {"vision": bool(vision), "connector": bool(vision) or connector,
             "llm": True}  # the loss is at the LLM's output: any training backpropagates through it
    return estimate(config, counts, trainable, largest, flows, shape)
