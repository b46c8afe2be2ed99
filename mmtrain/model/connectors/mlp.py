"""LLaVA's projector: a 2-layer MLP over every patch feature (the baseline connector)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmtrain.model.connectors.base import Connector, register_connector


@dataclass
class MLPOptions:
    depth: int = 2
    """Linear layers (LLaVA-1.5 `mlp2x_gelu`: 2); 1 gives LLaVA-1's single linear projection."""

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"mlp connector depth must be >= 1, got {self.depth}")


@register_connector
class MLPConnector(Connector):
    """One output token per vision token: patches (+CLS when kept)."""

    name = "mlp"
    options_class = MLPOptions
    splices = True

    def __init__(self, config):
        super().__init__(config)
        _, _, vision_width = config.vision_geometry()
        width = config.llm_hidden_size
        layers: list[nn.Module] = [nn.Linear(vision_width, width)]
        for _ in range(self.options.depth - 1):
            layers += [nn.GELU(), nn.Linear(width, width)]
        self.proj = nn.Sequential(*layers)

    @classmethod
    def num_slots(cls, config) -> int:
        return config.num_vision_tokens()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)
