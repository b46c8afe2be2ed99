"""MultiModal-GPT / OpenFlamingo: a perceiver resampler and gated cross-attention dense blocks.

The resampler turns each image's ViT tokens into 64 latents. Before every k-th decoder layer a gated block lets text
attend to the latents of the image(s) before it (Flamingo's media-position masking), then applies an FFN; both
outputs are scaled by tanh(gate), gates initialised to 0, so a fresh model computes exactly what the bare LLM does.

The blocks are inserted as forward pre-hooks on the LLM's decoder layers rather than by replacing the layers with
wrappers: the effect is open_flamingo's wrapping, but the LLM's parameter names stay those of its HF checkpoint, so
real checkpoints load as they are and LoRA targets keep their usual names. The blocks live in this connector.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.model.connectors.base import Connector, register_connector
from mmtrain.model.connectors.media import MediaState, masked_attention
from mmtrain.model.llm import decoder_layers


@dataclass
class XAttnOptions:
    num_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    cross_attn_every: int = 4
    """A gated block before decoder layer i when (i + 1) % cross_attn_every == 0 (OpenFlamingo's rule)."""
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    ff_mult: int = 4
    only_attend_immediate_media: bool = True
    """Flamingo: a token sees only the latest image before it; False: every image before it."""

    def __post_init__(self) -> None:
        if self.cross_attn_every < 1 or self.num_latents < 1:
            raise ValueError(f"xattn needs cross_attn_every >= 1 and num_latents >= 1, got {self.cross_attn_every}, {self.num_latents}")


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class PerceiverAttention(nn.Module):
    """Latents attend to [media; latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents_n = self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([self.norm_media(media), latents_n], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(_heads(self.to_q(latents_n), self.heads), _heads(k, self.heads), _heads(v, self.heads))
        return self.to_out(out.transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1))


class PerceiverResampler(nn.Module):
    """[N, P, D] -> [N, num_latents, D]."""

    def __init__(self, dim: int, o: XAttnOptions):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(o.num_latents, dim))
        self.attns = nn.ModuleList(PerceiverAttention(dim, o.resampler_heads, o.resampler_dim_head) for _ in range(o.resampler_depth))
        self.ffs = nn.ModuleList(FeedForward(dim, o.ff_mult) for _ in range(o.resampler_depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        latents = self.latents[None].expand(media.shape[0], -1, -1)
        for attn, ff in zip(self.attns, self.ffs):
            latents = latents + attn(media, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text queries attend to the latents of the images they may see."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, media: MediaState, immediate_only: bool) -> torch.Tensor:
        mask, has_media = media.visibility(immediate_only)
        batch, num_media, length, width = media.tokens.shape
        k, v = self.to_kv(media.tokens.reshape(batch, num_media * length, width).to(x.dtype)).chunk(2, dim=-1)
        q = _heads(self.to_q(self.norm(x)), self.heads)
        out = masked_attention(q, _heads(k, self.heads), _heads(v, self.heads), mask, has_media.to(x.dtype))
        return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(a) * xattn(x, media); then x + tanh(b) * ffn(x). Gates start at 0."""

    def __init__(self, dim: int, dim_visual: int, o: XAttnOptions):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, o.xattn_heads, o.xattn_dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, o.ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: MediaState, immediate_only: bool) -> torch.Tensor:
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.attn(x, media, immediate_only)
        return x + torch.tanh(self.ff_gate).to(x.dtype) * self.ff(x)


@register_connector
class XAttnConnector(Connector):
    """Resampled latents, read by gated cross-attention blocks before every k-th decoder layer."""

    name = "xattn"
    options_class = XAttnOptions
    splices = False

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        _, _, vision_width = config.vision_geometry()
        self.resampler = PerceiverResampler(vision_width, o)
        self.layer_ids = [i for i in range(config.llm_num_layers) if (i + 1) % o.cross_attn_every == 0]
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(config.llm_hidden_size, vision_width, o) for _ in self.layer_ids)
        self._media: MediaState | None = None
        self._handles: list[Any] = []

    @classmethod
    def num_slots(cls, config) -> int:
        return 1  # the `<image>` media marker itself

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.resampler(features)

    def attach(self, llm: nn.Module) -> None:
        self.detach()
        layers = decoder_layers(llm)
        for j, i in enumerate(self.layer_ids):
            self._handles.append(layers[i].register_forward_pre_hook(partial(self._pre_hook, j), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def condition(self, media: MediaState | None) -> None:
        self._media = media

    def _pre_hook(self, j: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._media is None:
            return None
        block = self.blocks[j]
        if args:
            return (block(args[0], self._media, self.options.only_attend_immediate_media), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = block(kwargs["hidden_states"], self._media, self.options.only_attend_immediate_media)
        return args, kwargs

    def lora_targets(self, role: str) -> list[str]:
        if role == "cross_attn":
            return [f"blocks.{j}.attn.{p}" for j in range(len(self.blocks)) for p in ("to_q", "to_kv", "to_out")]
        if role == "ffn":
            return [f"blocks.{j}.ff.{p}" for j in range(len(self.blocks)) for p in ("fc1", "fc2")]
        return []
