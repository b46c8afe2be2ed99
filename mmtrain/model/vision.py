"""Vision tower: any HF vision encoder that returns patch features (CLIP, SigLIP, ViT).

Built from a config dict (tests, tiny preset, meta-device counting) or loaded from a local directory holding a real
checkpoint. The tower returns one hidden state (last or penultimate layer), with or without the CLS token.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers import ViTConfig, ViTModel

from mmtrain.errors import UserError
from mmtrain.model.loading_report import check_loading_info

# model_type -> (model class, config class, has a CLS token). Full CLIP / SigLIP configs map to their vision part.
_FAMILIES: dict[str, tuple[type, type, bool]] = {
    "clip_vision_model": (CLIPVisionModel, CLIPVisionConfig, True),
    "clip": (CLIPVisionModel, CLIPVisionConfig, True),
    "siglip_vision_model": (SiglipVisionModel, SiglipVisionConfig, False),
    "siglip": (SiglipVisionModel, SiglipVisionConfig, False),
    "vit": (ViTModel, ViTConfig, True),
}

# Parameters our features never pass through (pooling heads, the final norm applied after the last hidden state).
# They stay frozen so that no "trainable" parameter silently lacks a gradient. Matched by name component because
# transformers 4.x nests CLIP under `vision_model.` and names ViT's blocks `encoder.layer`, while 5.x flattens both.
UNUSED = re.compile(r"(^|\.)(post_layernorm|head|pooler|layernorm)\.")


def _family(model_type: str) -> tuple[type, type, bool]:
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported vision model_type {model_type!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[model_type]


def vision_sub_config(config: dict[str, Any]) -> dict[str, Any]:
    """A full CLIP / SigLIP config holds the vision part under `vision_config`."""
    if config.get("model_type") in ("clip", "siglip"):
        sub = dict(config.get("vision_config") or {})
        sub.setdefault("model_type", config["model_type"] + "_vision_model")
        return sub
    return config


def vision_geometry(config: dict[str, Any]) -> tuple[int, bool, int]:
    """(patches per image, has CLS, hidden size) from a vision config dict alone."""
    sub = vision_sub_config(config)
    _, config_class, has_cls = _family(sub["model_type"])
    defaults = config_class()
    image_size = int(sub.get("image_size", defaults.image_size))
    patch_size = int(sub.get("patch_size", defaults.patch_size))
    hidden = int(sub.get("hidden_size", defaults.hidden_size))
    return (image_size // patch_size) ** 2, has_cls, hidden


def vision_class(config: dict[str, Any]) -> type[nn.Module]:
    """The HF encoder class a vision config dict builds."""
    return _family(vision_sub_config(config)["model_type"])[0]


def build_vision_config(config: dict[str, Any]):
    sub = vision_sub_config(config)
    _, config_class, _ = _family(sub["model_type"])
    kwargs = {k: v for k, v in sub.items() if k != "model_type"}
    return config_class(**kwargs)


class VisionTower(nn.Module):
    """Wraps an HF vision encoder; `forward(pixel_values) -> [N, tokens, hidden]` features of the chosen layer."""

    def __init__(self, model: nn.Module, select_layer: int = -1, keep_cls: bool = True, has_cls: bool = True):
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.keep_cls = keep_cls
        self.has_cls = has_cls

    @classmethod
    def from_config(cls, config: dict[str, Any], select_layer: int = -1, keep_cls: bool = True) -> "VisionTower":
        hf_config = build_vision_config(config)
        model_class, _, has_cls = _family(hf_config.model_type)
        kwargs = {"add_pooling_layer": False} if model_class is ViTModel else {}
        return cls(model_class(hf_config, **kwargs), select_layer, keep_cls, has_cls)

    @classmethod
    def from_pretrained(cls, path: str | Path, select_layer: int = -1, keep_cls: bool = True) -> "VisionTower":
        """Load a real checkpoint (a full CLIP / SigLIP checkpoint works: only its vision part is read)."""
        if not Path(path).is_dir():
            raise UserError(f"vision checkpoint directory not found: {path}")
        model_type = AutoConfig.from_pretrained(path).model_type
        model_class, _, has_cls = _family(model_type)
        kwargs = {"add_pooling_layer": False} if model_class is ViTModel else {}
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
        roots = {name.split(".")[0] for name in model.state_dict()}
        other = check_loading_info(info, path, "vision tower", own_roots=roots)
        if other:
            parts = sorted({name.split(".")[0] for name in other})
            warnings.warn(f"{path}: read its vision tower; left out the checkpoint's other parts ({len(other)} "
                          f"tensors under {', '.join(parts)})", stacklevel=2)
        return cls(model, select_layer, keep_cls, has_cls)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encoder_layers(self) -> nn.ModuleList:
        """The transformer blocks, in order (for `vision: last_n_layers` freeze policies)."""
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer"):
                return module
        raise ValueError(f"cannot find the encoder blocks of {type(self.model).__name__}")

    def unused_parameter_names(self) -> list[str]:
        """Parameters the selected features never pass through: pooling heads and final norms, and the encoder
        blocks after `select_layer` (-2, LLaVA's choice, leaves the last block out): a trainable tower freezes them."""
        blocks = self.encoder_layers()
        skipped = {id(p) for block in blocks[len(blocks) + self.select_layer + 1:] for p in block.parameters()}
        return [n for n, p in self.named_parameters() if UNUSED.search(n) or id(p) in skipped]

    def dummy_pixels(self, device: torch.device) -> torch.Tensor:
        """One black image: text-only batches still run the vision graph (ZeRO-3 gathers stay in step)."""
        size = self.image_size
        return torch.zeros(1, 3, size, size, device=device, dtype=self.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        if self.has_cls and not self.keep_cls:
            features = features[:, 1:]
        return features
