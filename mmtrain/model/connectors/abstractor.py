"""mPLUG-Owl's visual abstractor: N learnable queries distil the ViT tokens, then a projection to the LLM width.

Each of the L layers: the normalised queries attend to concat(normalised queries, normalised ViT tokens) as keys and
values (no separate self-attention), residual; then a SwiGLU FFN, residual. A linear maps the queries to the LLM
width and a learnable end-of-image vector is appended: 64 + 1 = 65 tokens per image, spliced at the image's slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmtrain.model.connectors.base import Connector, register_connector


@dataclass
class AbstractorOptions:
    num_queries: int = 64
    """Learnable queries, zero-initialised as in mPLUG-Owl (their splice positions differ, which breaks symmetry)."""
    num_layers: int = 6
    hidden_size: int = 1024
    """Abstractor width; ViT features are linearly mapped to it when the widths differ."""
    num_heads: int = 16
    intermediate_size: int = 2816
    """SwiGLU inner width (mPLUG-Owl: 2/3 of 4096 rounded up to a multiple of 256)."""
    end_token: bool = True
    """Append the learnable end-of-image vector (num_queries + 1 tokens per image)."""
    layer_norm_eps: float = 1e-6
    image_only: bool = False
    """Not in mPLUG-Owl (for models trained from scratch at toy scale): drop the output's image-independent paths.
    The queries only ask (their learned value is not carried into the output), they attend to the ViT tokens alone,
    and `visual_fc` has no bias, so the output is built from what was read from the image."""
    center: bool = False
    """Not in mPLUG-Owl: subtract the output's mean over images, per slot and channel, as batch normalisation does
    (the batch's mean while training with 2+ images, which updates a running mean; the running mean otherwise), so the
    tokens carry only what differs between images and cannot drift into a constant soft prompt."""
    center_momentum: float = 0.05
    output_scale: float = 0.0
    """Not in mPLUG-Owl: > 0 RMS-normalises every output token to this scale (learnable per-channel gain starting
    there), e.g. the LLM's text-embedding scale; 0 (default) leaves the output as `visual_fc` gives it."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"abstractor hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_queries < 1 or self.num_layers < 0:
            raise ValueError(f"abstractor needs num_queries >= 1 and num_layers >= 0, got {self.num_queries}, {self.num_layers}")


class AbstractorLayer(nn.Module):
    """Queries attend to [queries; ViT tokens], then SwiGLU; both pre-norm with residuals."""

    def __init__(self, o: AbstractorOptions):
        super().__init__()
        h = o.hidden_size
        self.num_heads = o.num_heads
        self.attend_queries = not o.image_only
        self.norm_q = nn.LayerNorm(h, eps=o.layer_norm_eps)
        self.norm_kv = nn.LayerNorm(h, eps=o.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h) for _ in range(4))
        self.norm_ffn = nn.LayerNorm(h, eps=o.layer_norm_eps)
        self.w1 = nn.Linear(h, o.intermediate_size)
        self.w3 = nn.Linear(h, o.intermediate_size)
        self.ffn_ln = nn.LayerNorm(o.intermediate_size, eps=o.layer_norm_eps)
        self.w2 = nn.Linear(o.intermediate_size, h)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(queries)
        kv = torch.cat([q, self.norm_kv(vision)], dim=1) if self.attend_queries else self.norm_kv(vision)
        attn = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv)))
        queries = queries + self.o_proj(attn.transpose(1, 2).reshape(queries.shape))
        x = self.norm_ffn(queries)
        return queries + self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class VisualAbstractor(nn.Module):
    """[N, P, vision width] -> [N, num_queries (+1), out_width]."""

    def __init__(self, o: AbstractorOptions, vision_width: int, out_width: int):
        super().__init__()
        # image_only: the queries never meet each other, so they start apart (random) instead of at zero
        init = torch.randn(1, o.num_queries, o.hidden_size) * 0.02 if o.image_only else torch.zeros(1, o.num_queries, o.hidden_size)
        self.queries = nn.Parameter(init)
        self.vision_in = nn.Linear(vision_width, o.hidden_size) if vision_width != o.hidden_size else nn.Identity()
        self.layers = nn.ModuleList(AbstractorLayer(o) for _ in range(o.num_layers))
        self.image_only = o.image_only
        self.visual_fc = nn.Linear(o.hidden_size, out_width, bias=not o.image_only)
        self.output_gain = nn.Parameter(torch.full((out_width,), float(o.output_scale))) if o.output_scale > 0 else None
        self.eps = o.layer_norm_eps
        self.center_momentum = o.center_momentum
        if o.center:
            self.register_buffer("running_mean", torch.zeros(o.num_queries, out_width))
        else:
            self.running_mean = None
        self.end_token = nn.Parameter(torch.randn(1, 1, out_width) * 0.02) if o.end_token else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        vision = self.vision_in(features)
        queries = self.queries.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, vision)
        if self.image_only:  # keep what the layers added, not the learned queries themselves
            queries = queries - self.queries
        out = self.visual_fc(queries)
        if self.running_mean is not None:
            if self.training and out.shape[0] > 1:
                mean = out.mean(0)
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.center_momentum)
            else:
                mean = self.running_mean.to(out.dtype)
            out = out - mean
        if self.output_gain is not None:
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps) * self.output_gain
        if self.end_token is not None:
            out = torch.cat([out, self.end_token.expand(out.shape[0], -1, -1)], dim=1)
        return out


@register_connector
class AbstractorConnector(Connector):
    """mPLUG-Owl: 65 tokens per image spliced into the LLM input."""

    name = "abstractor"
    options_class = AbstractorOptions
    splices = True

    def __init__(self, config):
        super().__init__(config)
        _, _, vision_width = config.vision_geometry()
        self.abstractor = VisualAbstractor(self.options, vision_width, config.llm_hidden_size)

    @classmethod
    def num_slots(cls, config) -> int:
        o = config.connector_options()
        return o.num_queries + int(o.end_token)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.abstractor(features)

    def lora_targets(self, role: str) -> list[str]:
        if role == "cross_attn":
            return [f"abstractor.layers.{i}.{p}" for i in range(len(self.abstractor.layers)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        return []
