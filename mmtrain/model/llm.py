"""The causal LM part: built from its HF config dict or loaded from a local checkpoint, and the few structural
look-ups the connectors need (decoder layers, their self-attention), written once for every HF decoder family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mmtrain.errors import UserError
from mmtrain.model.loading_report import check_loading_info


def build_text_config(config: dict[str, Any]):
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **kwargs)


def llm_class(config: dict[str, Any]) -> type[PreTrainedModel]:
    """The causal-LM class for a config dict, its module imported (transformers imports model code lazily)."""
    text_config = build_text_config(config)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    except KeyError:
        raise UserError(f"LLM model_type {config['model_type']!r} has no causal-LM class in transformers") from None


def build_llm(config: dict[str, Any]) -> PreTrainedModel:
    """A randomly initialised causal LM from its config dict (tests, tiny preset, meta-device counting)."""
    return AutoModelForCausalLM.from_config(build_text_config(config))


def load_llm(path: str | Path) -> PreTrainedModel:
    if not Path(path).is_dir():
        raise UserError(f"LLM checkpoint directory not found: {path}")
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    check_loading_info(info, path, "LLM")
    return model


def inputs_embeds_scale(llm: nn.Module) -> float:
    """The factor the LLM itself multiplies `inputs_embeds` by before its first layer: √hidden for Gemma and
    Gemma-2 under transformers 4.x, 1 elsewhere (transformers 5 moved that scale into Gemma's embedding module, as
    Gemma-3 always had it). Tokens spliced among the embeddings are divided by it, so that they reach the first
    layer as the connector made them, beside the scaled text embeddings, whichever transformers runs."""
    config = llm.config
    if config.model_type in ("gemma", "gemma2") and not hasattr(llm.get_input_embeddings(), "embed_scale"):
        return float(config.hidden_size) ** 0.5
    return 1.0


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any HF causal LM (`model.layers` for LLaMA / Qwen2, `gpt_neox.layers` for GPT-NeoX)."""
    base = getattr(llm, "base_model", llm)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(llm).__name__}")


def self_attention(layer: nn.Module) -> nn.Module:
    """The self-attention module of a decoder layer (`self_attn` in LLaMA-family models, `attention` in GPT-NeoX)."""
    for name in ("self_attn", "attention", "attn"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the self-attention of {type(layer).__name__}")
