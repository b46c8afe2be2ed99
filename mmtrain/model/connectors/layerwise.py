"""PUMGPT's layer-wise adapters, in OUR reading of the paper's abstract (its method section is not public).

"Enhanced alignment with fewer visual tokens ... parameter-efficient fine-tuning" is read as: an abstractor distils
each image into K tokens (default 8, no end token); for every decoder layer l a small low-rank adapter refines those
tokens (t_l = t + up_l(down_l(norm_l(t)))), the layer's own k_proj / v_proj turn them into prefix keys / values, and
the layer's text queries (its own q_proj, no rotary: the prefix has no position) attend to them in a separate softmax.
The result goes through the layer's o_proj and is added to the self-attention output, scaled by tanh(gate_l), gate_l
initialised to 0. This is a gated prefix attention (LLaMA-Adapter style) with no tokens added to the text sequence; a
zero gate gives exactly the bare LLM. Implemented as a forward hook on each layer's self-attention, so the LLM's
parameter names stay those of its checkpoint. A fused qkv_proj (Phi-3) serves as q/k/v_proj, sliced as Phi-3
slices it.

Image position: the layer-wise connector takes 0 slots in the text; `image_slots[i] = (sample, p)` where p is the
position of the first token after where `<image>` was written. Tokens at positions >= p see the image (all earlier
images too, unless `only_attend_immediate_media`); tokens before it see nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from mmtrain.model.connectors.abstractor import AbstractorOptions, VisualAbstractor
from mmtrain.model.connectors.base import Connector, register_connector
from mmtrain.model.connectors.media import MediaState, masked_attention
from mmtrain.model.llm import decoder_layers, self_attention


@dataclass
class LayerwiseOptions:
    num_tokens: int = 8
    """K visual tokens per image (abstractor queries; no end-of-image token)."""
    abstractor_layers: int = 6
    abstractor_hidden_size: int = 1024
    abstractor_heads: int = 16
    abstractor_intermediate_size: int = 2816
    adapter_rank: int = 64
    """Rank of each layer's token refinement (2 * width * rank parameters per decoder layer)."""
    only_attend_immediate_media: bool = False

    def abstractor_options(self) -> AbstractorOptions:
        return AbstractorOptions(num_queries=self.num_tokens, num_layers=self.abstractor_layers, hidden_size=self.abstractor_hidden_size,
                                 num_heads=self.abstractor_heads, intermediate_size=self.abstractor_intermediate_size, end_token=False)

    def __post_init__(self) -> None:
        if self.adapter_rank < 1:
            raise ValueError(f"layerwise adapter_rank must be >= 1, got {self.adapter_rank}")
        self.abstractor_options()  # validates the abstractor part


class LayerAdapter(nn.Module):
    """One decoder layer's view of the visual tokens, and its gate."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.up(self.down(self.norm(tokens)))


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _projections(attn: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's own projections: text queries of `hidden`, prefix keys and values of `tokens`. A fused
    `qkv_proj` (Phi-3) is sliced as its family slices it: [q heads; k heads; v heads] along the output."""
    if not hasattr(attn, "qkv_proj"):
        return attn.q_proj(hidden), attn.k_proj(tokens), attn.v_proj(tokens)
    queries = attn.config.num_attention_heads * head_dim
    kv = getattr(attn.config, "num_key_value_heads", None) or attn.config.num_attention_heads
    keys, values = attn.qkv_proj(tokens)[..., queries:].split(kv * head_dim, dim=-1)
    return attn.qkv_proj(hidden)[..., :queries], keys, values


@register_connector
class LayerwiseConnector(Connector):
    """K tokens per image, attended to as a gated prefix by every decoder layer's self-attention."""

    name = "layerwise"
    options_class = LayerwiseOptions
    splices = False

    def __init__(self, config):
        super().__init__(config)
        _, _, vision_width = config.vision_geometry()
        width = config.llm_hidden_size
        self.abstractor = VisualAbstractor(self.options.abstractor_options(), vision_width, width)
        self.adapters = nn.ModuleList(LayerAdapter(width, self.options.adapter_rank) for _ in range(config.llm_num_layers))
        self._media: MediaState | None = None
        self._handles: list[Any] = []

    @classmethod
    def num_slots(cls, config) -> int:
        return 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.abstractor(features)

    def attach(self, llm: nn.Module) -> None:
        self.detach()
        for i, layer in enumerate(decoder_layers(llm)):
            attn = self_attention(layer)
            missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, p)]
            if missing and not (hasattr(attn, "qkv_proj") and hasattr(attn, "o_proj")):
                raise ValueError(f"layerwise adapters need separate q/k/v/o projections; {type(attn).__name__} lacks "
                                 f"{missing} (nor has it Phi-3's fused qkv_proj + o_proj)")
            self._handles.append(attn.register_forward_hook(partial(self._post_hook, i), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def condition(self, media: MediaState | None) -> None:
        self._media = media

    def _prefix_attention(self, i: int, attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        media = self._media
        batch, num_media, k, width = media.tokens.shape
        tokens = self.adapters[i](media.tokens.reshape(batch, num_media * k, width).to(hidden.dtype))
        head_dim = int(getattr(attn, "head_dim", attn.config.hidden_size // attn.config.num_attention_heads))
        q, keys, values = (_split_heads(x, head_dim) for x in _projections(attn, hidden, tokens, head_dim))
        if hasattr(attn, "q_norm") and hasattr(attn, "k_norm"):  # Qwen3-style per-head norms
            q, keys = attn.q_norm(q.transpose(1, 2)).transpose(1, 2), attn.k_norm(keys.transpose(1, 2)).transpose(1, 2)
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        mask, has_media = media.visibility(self.options.only_attend_immediate_media)
        out = masked_attention(q, keys, values, mask, has_media.to(hidden.dtype))
        return attn.o_proj(out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1))

    def _post_hook(self, i: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._media is None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        extra = torch.tanh(self.adapters[i].gate).to(hidden.dtype) * self._prefix_attention(i, module, hidden)
        if isinstance(output, tuple):
            return (output[0] + extra, *output[1:])
        return output + extra

    def lora_targets(self, role: str) -> list[str]:
        layers = range(len(self.abstractor.layers))
        if role == "cross_attn":
            return [f"abstractor.layers.{i}.{p}" for i in layers for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        return []
