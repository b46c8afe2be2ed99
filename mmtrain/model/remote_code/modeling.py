"""The VisionLanguageModel as transformers classes: what `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` builds from an exported directory.

This module travels inside an exported directory (`mmtrain.model.remote_code.write_remote_code` copies it there as
`modeling_mmtrain_vlm.py`, beside copies of the model modules it imports), so it imports nothing from mmtrain but the
model itself. The wrapper holds the VisionLanguageModel's own parts as its children: its tensor names are ours
(`vision.model.…`, `connector.…`, `llm.…`), so one model.safetensors serves both loaders, and its forward is ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from mmtrain.model.config import MODEL_TYPE, VLMConfig
from mmtrain.model.vlm import VisionLanguageModel

SUB_CONFIGS = ("text_config", "vision_config")
"""VLMConfig fields that hold a part's HF config dict: transformers' config keeps them as config objects."""


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


class MMTrainVLMConfig(PretrainedConfig):
    """VLMConfig's fields as a transformers config; the text and vision parts as their own HF config objects (so
    transformers finds `text_config` as it does for its own composite models)."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}
    has_no_defaults_at_init = True  # a default instance names no parts; transformers 4.x must not build one to diff

    def __init__(self, **kwargs: Any) -> None:
        for field in dataclasses.fields(VLMConfig):
            value = kwargs.pop(field.name) if field.name in kwargs else _field_default(field)
            if field.name in SUB_CONFIGS:
                value = AutoConfig.for_model(**value) if isinstance(value, dict) and value else (value or None)
            setattr(self, field.name, value)
        super().__init__(**kwargs)

    def vlm_config(self) -> VLMConfig:
        """The VLMConfig these fields describe (validated by it)."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(VLMConfig)}
        for name in SUB_CONFIGS:
            part = data[name]
            data[name] = part.to_dict() if isinstance(part, PretrainedConfig) else dict(part or {})
            data[name].pop("transformers_version", None)
        return VLMConfig(**data)


def image_slots_from_placeholders(input_ids: torch.Tensor, image_token_id: int, slots_per_image: int) -> torch.Tensor:
    """[N, 2] (sample, start) of each image's run of placeholders, in row-major order: the order `pixel_values` must
    follow. A run of k * slots_per_image placeholders is k images back to back."""
    if slots_per_image < 1:
        raise ValueError("this connector puts no placeholders in the text: pass image_slots (sample, position) "
                         "for every image")
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)
    if rows.numel() % slots_per_image:
        raise ValueError(f"input_ids hold {rows.numel()} image placeholders (id {image_token_id}), not a multiple of "
                         f"{slots_per_image} per image")
    rows, cols = rows.view(-1, slots_per_image), cols.view(-1, slots_per_image)
    offsets = torch.arange(slots_per_image, device=cols.device)
    if not (bool((rows == rows[:, :1]).all()) and bool((cols - cols[:, :1] == offsets).all())):
        raise ValueError(f"image placeholders do not form runs of {slots_per_image} within a row; pass image_slots")
    return torch.stack([rows[:, 0], cols[:, 0]], dim=1)


class MMTrainVLMForCausalLM(PreTrainedModel):
    """mmtrain's VisionLanguageModel behind transformers' loading API: forward takes input_ids, attention_mask,
    labels, pixel_values [N, 3, H, W] and image_slots [N, 2] (derived from the placeholder runs when omitted, except
    for the layer-wise connector, which puts none in the text) and returns the LLM's output (loss, logits)."""

    config_class = MMTrainVLMConfig
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: MMTrainVLMConfig) -> None:
        super().__init__(config)
        vlm = VisionLanguageModel.from_config(config.vlm_config())
        self.vision, self.connector, self.llm = vlm.vision, vlm.connector, vlm.llm
        # the composite runs on these same children; kept off the module tree so tensor names stay ours
        object.__setattr__(self, "vlm", vlm)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: mmtrain's modules initialise themselves when built, and a loaded model takes every tensor from
        model.safetensors (transformers' generic init would overwrite them)."""

    def train(self, mode: bool = True) -> "MMTrainVLMForCausalLM":
        super().train(mode)
        self.vlm.training = mode  # generation restores the mode it finds on the composite
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    @property
    def num_image_slots(self) -> int:
        """Placeholder tokens per image in the text (0 for the layer-wise connector)."""
        return self.vlm.num_image_slots

    def _slots(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               image_slots: torch.Tensor | None) -> torch.Tensor | None:
        if image_slots is not None or pixel_values is None or pixel_values.shape[0] == 0:
            return image_slots
        return image_slots_from_placeholders(input_ids, self.vlm.config.image_token_id, self.num_image_slots)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_slots: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool = False, reuse_media: bool = False,
                segment_ids: torch.Tensor | None = None) -> Any:
        """The VisionLanguageModel's forward (loss over labels != -100, logits)."""
        return self.vlm(input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                        image_slots=self._slots(input_ids, pixel_values, image_slots), position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache, reuse_media=reuse_media,
                        segment_ids=segment_ids)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_slots: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """mmtrain's generation: [B, max_new_tokens] new tokens only (not transformers' GenerationMixin, which knows
        nothing of images); kwargs as `mmtrain.model.generation.generate`."""
        return self.vlm.generate(input_ids, pixel_values=pixel_values,
                                 image_slots=self._slots(input_ids, pixel_values, image_slots), **kwargs)
