"""Named model configurations: `tiny` (CPU-trainable in minutes) and the paper-scale models with their real parts.

Paper-scale presets name their parts' published configs (CLIP ViT-L/14, LLaMA-7B) and take local checkpoint
directories (`vision_path`, `llm_path`); nothing is ever downloaded. `summarize` counts parameters on the meta device,
from configs alone, and estimates ZeRO-3 per-GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from mmtrain.errors import UserError
from mmtrain.model.checkpoint_configs import text_config_from, vision_config_from
from mmtrain.model.config import VLMConfig
from mmtrain.model.lora import parameter_counts
from mmtrain.model.vlm import VisionLanguageModel

CLIP_VIT_L14_224: dict[str, Any] = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
LLAMA_7B: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}
PUBLISHED = {"vision": ("CLIP ViT-L/14", 304e6), "llm": ("LLaMA-7B", 6.74e9)}
"""Published sizes of the paper-scale parts (ViT-L/14 image tower about 304 M; LLaMA-7B 6.74 B)."""

TINY_CONNECTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "abstractor": {"num_queries": 64, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128},
    "xattn": {"num_latents": 8, "resampler_depth": 1, "resampler_heads": 2, "resampler_dim_head": 16, "cross_attn_every": 2,
              "xattn_heads": 2, "xattn_dim_head": 16, "ff_mult": 2},
    "layerwise": {"num_tokens": 4, "abstractor_layers": 1, "abstractor_hidden_size": 64, "abstractor_heads": 4,
                  "abstractor_intermediate_size": 128, "adapter_rank": 8},
    "mlp": {},
}


def tiny_config(connector: str = "abstractor", llm_family: str = "llama", vision_family: str = "clip_vision_model",
                image_size: int = 32, patch_size: int = 8, hidden: int = 64, layers: int = 4, vocab_size: int = 256,
                image_token_id: int | None = None, **overrides: Any) -> VLMConfig:
    """A tiny config of any connector / LLM family / vision family: the test fixture and the basis of `tiny`."""
    heads = max(hidden // 16, 1)
    vision = {"model_type": vision_family, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
              "num_attention_heads": heads, "image_size": image_size, "patch_size": patch_size}
    text: dict[str, Any] = {"model_type": llm_family, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                            "num_hidden_layers": layers, "num_attention_heads": heads, "vocab_size": vocab_size,
                            "max_position_embeddings": 512, "tie_word_embeddings": False}
    if llm_family == "gpt_neox":
        text.update({"rotary_pct": 1.0, "use_parallel_residual": True})
    else:  # explicit: some defaults ignore the width (Qwen3: 8 KV heads, head_dim 128; Gemma: head_dim 256)
        text.update({"num_key_value_heads": max(heads // 2, 1), "head_dim": hidden // heads})
    if llm_family == "phi3":  # Phi-3's default special-token ids (32000) lie outside a tiny vocabulary
        text.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    options = dict(TINY_CONNECTOR_OPTIONS[connector])
    options.update(overrides.pop("connector_config", {}))
    return VLMConfig(connector=connector, vision_config=vision, text_config=text, connector_config=options,
                     image_token_id=vocab_size - 1 if image_token_id is None else image_token_id, **overrides)


def _tiny(**paths: Any) -> VLMConfig:
    """~10 M parameters, 64 px images: the recipe for CPU smoke runs (vocabulary sized for a LLaMA tokenizer + extras)."""
    return tiny_config("abstractor", image_size=64, patch_size=8, hidden=128, layers=4, vocab_size=32064, image_token_id=32000,
                       connector_config={"hidden_size": 128, "num_heads": 4, "intermediate_size": 256}, **paths)


def _paper(connector: str, options: dict[str, Any], select_layer: int, keep_cls: bool, text: dict[str, Any] | None = None,
           image_token_id: int = 32000, **paths: Any) -> VLMConfig:
    return VLMConfig(connector=connector, vision_config=dict(CLIP_VIT_L14_224), text_config=dict(text or LLAMA_7B),
                     image_token_id=image_token_id, vision_select_layer=select_layer, vision_keep_cls=keep_cls,
                     connector_config=options, **paths)


PRESETS: dict[str, Callable[..., VLMConfig]] = {
    "tiny": _tiny,
    # mPLUG-Owl: CLIP ViT-L/14 224 (all 257 tokens) + abstractor 64 queries x 6 layers + LLaMA-7B.
    "owl-7b": lambda **p: _paper("abstractor", {"num_queries": 64, "num_layers": 6, "hidden_size": 1024, "num_heads": 16,
                                                "intermediate_size": 2816}, -1, True, **p),
    # MultiModal-GPT (OpenFlamingo-9B layout): perceiver 64 latents x depth 6, gated xattn before every 4th layer.
    "mmgpt-9b": lambda **p: _paper("xattn", {}, -1, False, text={**LLAMA_7B, "vocab_size": 32002}, **p),
    # PUMGPT, our reading: 8 abstractor tokens per image, a gated prefix adapter in every decoder layer.
    "pum-7b": lambda **p: _paper("layerwise", {"num_tokens": 8}, -1, True, **p),
    # LLaVA baseline: penultimate layer, patches only (256 slots), 2-layer MLP.
    "llava-7b": lambda **p: _paper("mlp", {"depth": 2}, -2, False, **p),
}


def preset_config(name: str, vision_path: str | None = None, llm_path: str | None = None) -> VLMConfig:
    """A preset's model config. A preset names its connector and published part configs; a part given as a local
    checkpoint directory is described by that checkpoint's own config.json instead (the published copy is for
    `model summary` and runs from scratch)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name](vision_path=vision_path, llm_path=llm_path)
    if not (vision_path or llm_path):
        return config
    raw = config.to_dict()
    if vision_path:
        raw["vision_config"] = vision_config_from(vision_path)
    if llm_path:
        raw["text_config"] = text_config_from(llm_path)
    return VLMConfig.from_dict(raw)


def build_preset(name: str, vision_path: str | None = None, llm_path: str | None = None, pretrained: bool | None = None):
    """The model of a preset; paper-scale presets load their parts from the local paths (required)."""
    config = preset_config(name, vision_path, llm_path)
    if pretrained is None:
        pretrained = name != "tiny"
    return VisionLanguageModel.from_config(config, pretrained=pretrained)


@dataclass
class Summary:
    name: str
    config: VLMConfig
    counts: dict[str, int]
    """Parameters per part and `total`."""
    largest_layer: int
    """Parameters of the largest single module's own weights (what ZeRO-3 gathers at once)."""

    def zero3_bytes_per_gpu(self, gpus: int, trainable: int | None = None) -> float:
        """DeepSpeed's estimate of ZeRO-3 model-state memory per GPU (no offload, Adam, mixed precision):
        4 B x largest layer + (18 B x trainable + 2 B x frozen) / GPUs. Activations come on top."""
        total = self.counts["total"]
        trainable = total if trainable is None else trainable
        return 4 * self.largest_layer + (18 * trainable + 2 * (total - trainable)) / gpus


def summarize(name: str) -> Summary:
    """Counts from configs alone: the model is built on the meta device (no weights, no download)."""
    config = preset_config(name)
    with torch.device("meta"):
        model = VisionLanguageModel.from_config(config, pretrained=False)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return Summary(name, config, parameter_counts(model), largest)
