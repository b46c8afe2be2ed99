"""The one connector interface and its registry (name -> class, raising on unknown names).

A connector turns vision features into what the LLM consumes. Two kinds:
- splicing connectors (`abstractor`, `mlp`) return tokens that replace the placeholder slots of the text;
- conditioning connectors (`xattn`, `layerwise`) attach to the LLM's decoder layers with hooks and read the
  per-sample media set by `condition()` before each LLM call; they put 1 (xattn) or 0 (layerwise) slots in the text.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from mmtrain.model.connectors.media import MediaState


class ModelShape(Protocol):
    """What a connector reads of the model's config (`mmtrain.model.config.VLMConfig` is the one implementation;
    naming it here would tie the registry and the config into an import circle)."""

    connector: str
    connector_config: dict[str, Any]

    def connector_options(self) -> Any: ...

    def vision_geometry(self) -> tuple[int, bool, int]: ...

    def num_vision_tokens(self) -> int: ...

    @property
    def llm_hidden_size(self) -> int: ...

    @property
    def llm_num_layers(self) -> int: ...

CONNECTORS: dict[str, type["Connector"]] = {}


def register_connector(cls: type["Connector"]) -> type["Connector"]:
    """Class decorator: make `cls` available as `connector: <cls.name>` in model configs."""
    if cls.name in CONNECTORS:
        raise ValueError(f"connector {cls.name!r} registered twice")
    CONNECTORS[cls.name] = cls
    return cls


def connector_class(name: str) -> type["Connector"]:
    if name not in CONNECTORS:
        raise ValueError(f"unknown connector {name!r}; known connectors: {sorted(CONNECTORS)}")
    return CONNECTORS[name]


class Connector(nn.Module):
    """Base class. Subclasses set `name`, `options_class`, `splices` and implement `forward` and `num_slots`."""

    name: ClassVar[str] = ""
    options_class: ClassVar[type] = object
    splices: ClassVar[bool] = True

    def __init__(self, config: ModelShape):
        super().__init__()
        self.options: Any = config.connector_options()

    @classmethod
    def num_slots(cls, config: ModelShape) -> int:
        """Placeholder tokens per image in the text."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N_img, vision tokens, vision hidden] -> [N_img, tokens, width] (LLM width when splicing)."""
        raise NotImplementedError

    # ---- conditioning connectors only ------------------------------------------------------------------------------
    def attach(self, llm: nn.Module) -> None:
        """Hook into the LLM's decoder layers (no-op for splicing connectors)."""

    def detach(self) -> None:
        """Remove the hooks `attach` added."""

    def condition(self, media: MediaState | None) -> None:
        """Set the media the hooks read during the next LLM calls; None makes the LLM run bare."""

    def lora_targets(self, role: str) -> list[str]:
        """Module names (relative to the connector) that LoRA role `role` adapts; [] when the role has none here."""
        return []
