"""The composite model: vision tower -> connector -> any HF causal LM.

`VisionLanguageModel(config, vision, connector, llm)` is mPLUG-Owl, MultiModal-GPT, PUMGPT or LLaVA depending on
`config.connector`. The parts stay plain HF modules (their parameter names are their checkpoints' names, under the
`vision.model.`, `llm.` prefixes), so real checkpoints load into them as they are.

Batch contract (from the data side): input_ids / attention_mask / labels [B, T]; pixel_values [N_img, 3, H, W]
(N_img may be 0); image_slots [N_img, 2] long = (sample index, start position) in the order of pixel_values.
Packed rows add position_ids (restarting per sample) and segment_ids [B, T] (1, 2, … per sample, 0 on padding): the
model turns them into the document mask its attention implementation takes (`mmtrain.model.attention`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtrain.errors import UserError
from mmtrain.model.attention import packed_attention_inputs, set_attention
from mmtrain.model.config import VLMConfig
from mmtrain.model.connectors import Connector, build_connector, connector_class
from mmtrain.model.connectors.media import build_media
from mmtrain.model.generation import generate
from mmtrain.model.llm import build_llm, inputs_embeds_scale, llm_class, load_llm
from mmtrain.model.vision import VisionTower, vision_class
from mmtrain.model.weights_io import WEIGHTS_NAME, merged_state_dict, read_weights, save_weights



def _fit_vocabulary(llm: nn.Module, config: VLMConfig) -> nn.Module:
    """Grow the LLM's token embeddings (and an untied LM head) to the config's vocabulary: tokens a tokenizer added
    to a pretrained LLM (`<image>`, `<pad>`), and xattn's embedded `<image>` marker (as OpenFlamingo adds it). New
    rows start at the mean of the old ones, so an added token begins as an average token, not as noise."""
    old = llm.get_input_embeddings().num_embeddings
    target = max(int(config.text_config.get("vocab_size", old)), old)
    if config.connector == "xattn" and config.image_token_id >= target:
        target = config.image_token_id + 1
    if target == old:
        return llm
    llm.resize_token_embeddings(target)
    with torch.no_grad():
        for table in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}\
                .values():
            table.weight[old:] = table.weight[:old].mean(dim=0)
    config.text_config["vocab_size"] = target
    return llm


class VisionLanguageModel(nn.Module):
    """Vision tower + connector + causal LM, with an HF-style `save_pretrained` / `from_pretrained`."""

    def __init__(self, config: VLMConfig, vision: VisionTower, connector: Connector, llm: nn.Module):
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.attention = "sdpa"
        connector.attach(llm)

    def set_attention(self, implementation: str) -> None:
        """Self-attention of the LLM: sdpa (dense masks) | flex | flash_varlen (see `mmtrain.model.attention`)."""
        set_attention(self.llm, implementation)
        self.attention = implementation

    # ---- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: VLMConfig, pretrained: bool = False) -> "VisionLanguageModel":
        """Build the parts from their configs; `pretrained=True` loads vision / LLM from `vision_path` / `llm_path`."""
        if pretrained:
            missing = [n for n in ("vision_path", "llm_path") if not getattr(config, n)]
            if missing:
                raise UserError(f"pretrained=True needs local checkpoint paths; unset: {', '.join(missing)}")
            vision = VisionTower.from_pretrained(config.vision_path, config.vision_select_layer, config.vision_keep_cls)
            llm = load_llm(config.llm_path)
        else:
            vision = VisionTower.from_config(config.vision_config, config.vision_select_layer, config.vision_keep_cls)
            llm = build_llm(config.text_config)
        return cls(config, vision, build_connector(config), _fit_vocabulary(llm, config))

    @property
    def num_image_slots(self) -> int:
        """Placeholder tokens per image in the text (65 abstractor; patches mlp; 1 xattn; 0 layerwise)."""
        return self.config.num_image_slots()

    # ---- vision path ---------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, bool]:
        """Connector output for the batch's images, or for one dummy image when there are none (flag True)."""
        dummy = pixel_values is None or pixel_values.shape[0] == 0
        pixels = self.vision.dummy_pixels(device) if dummy else pixel_values
        return self.connector(self.vision(pixels)), dummy

    def _check_slots(self, input_ids: torch.Tensor, image_slots: torch.Tensor, num_images: int) -> None:
        """Placeholder runs must match the features exactly; mismatches raise with both numbers."""
        if image_slots is None or tuple(image_slots.shape) != (num_images, 2):
            shape = None if image_slots is None else tuple(image_slots.shape)
            raise ValueError(f"{num_images} images need image_slots of shape ({num_images}, 2), got {shape}")
        slots, length = self.num_image_slots, input_ids.shape[1]
        placeholders = int((input_ids == self.config.image_token_id).sum())
        if placeholders != num_images * slots:
            raise ValueError(f"input_ids hold {placeholders} image placeholder tokens (id {self.config.image_token_id}) but "
                             f"{num_images} images x {slots} slots = {num_images * slots} features")
        for i, (sample, start) in enumerate(image_slots.tolist()):
            end = start + max(slots, 1) if slots else start
            if not (0 <= sample < input_ids.shape[0]) or start < 0 or end > length + (0 if slots else 1):
                raise ValueError(f"image {i}: slot run ({sample}, {start}) x {slots} falls outside the batch [{input_ids.shape[0]}, {length}]")
            if slots and not bool((input_ids[sample, start:end] == self.config.image_token_id).all()):
                raise ValueError(f"image {i}: sample {sample} positions {start}..{end - 1} are not all image placeholders")

    def _splice(self, embeds: torch.Tensor, tokens: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor:
        num_images, slots, width = tokens.shape
        offsets = torch.arange(slots, device=embeds.device)
        rows = image_slots[:, 0].to(embeds.device)[:, None].expand(num_images, slots).reshape(-1)
        cols = (image_slots[:, 1].to(embeds.device)[:, None] + offsets[None]).reshape(-1)
        tokens = tokens.reshape(-1, width) / inputs_embeds_scale(self.llm)  # Gemma on transformers 4.x (llm.py)
        return embeds.index_put((rows, cols), tokens.to(embeds.dtype))

    def prepare_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_slots: torch.Tensor | None = None,
                       past_length: int = 0, reuse_media: bool = False,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings with images spliced in (splicing connectors) or the connector conditioned (the others).

        `reuse_media=True` (cached decoding) skips the vision path and keeps the media of the prefill call.
        """
        ids = input_ids
        if self.connector.splices:
            ids = torch.where(input_ids == self.config.image_token_id, torch.zeros_like(input_ids), input_ids)
        embeds = self.llm.get_input_embeddings()(ids)
        if reuse_media:
            self._set_token_positions(input_ids, past_length, position_ids)
            return embeds
        tokens, dummy = self.encode_images(pixel_values, embeds.device)
        if not dummy:
            self._check_slots(input_ids, image_slots, tokens.shape[0])
        if self.connector.splices:
            if dummy:  # same graph on every rank; the dummy contributes exactly zero
                return embeds + 0.0 * tokens.sum().to(embeds.dtype)
            return self._splice(embeds, tokens, image_slots)
        self.connector.condition(build_media(tokens, None if dummy else image_slots.to(tokens.device), input_ids.shape[0]))
        self._set_token_positions(input_ids, past_length, position_ids)
        return embeds

    def _set_token_positions(self, input_ids: torch.Tensor, past_length: int,
                             position_ids: torch.Tensor | None = None) -> None:
        """Row positions of this call's tokens and, from `position_ids` (which restart per packed sample, and
        skip left padding), where each token's sample starts: a token sees only its own sample's images."""
        media = getattr(self.connector, "_media", None)
        if media is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device) + past_length
            media.token_positions = positions[None].expand(input_ids.shape[0], -1)
            media.segment_starts = (None if position_ids is None
                                    else media.token_positions - position_ids.to(input_ids.device).long())

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_slots: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
                reuse_media: bool = False, segment_ids: torch.Tensor | None = None) -> Any:
        """LM loss (mean over labels != -100, HF's shift) and logits. Packed rows pass `segment_ids` (and
        `position_ids`): attention then stays within each sample, whatever `attention_mask` says."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        embeds = self.prepare_inputs(input_ids, pixel_values, image_slots, past_length, reuse_media, position_ids)
        packed: dict[str, Any] = {}
        if segment_ids is not None:
            packed = packed_attention_inputs(self.attention, segment_ids.to(embeds.device), embeds.dtype)
            attention_mask = packed.pop("attention_mask")
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache, **packed)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Greedy or sampled continuation with images; see `mmtrain.model.generation.generate`."""
        return generate(self, input_ids, **kwargs)

    # ---- save / load ---------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors. LoRA adapters, if injected, are merged into the saved base weights."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        save_weights(merged_state_dict(self), path / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "VisionLanguageModel":
        path = Path(directory)
        model = cls.from_config(VLMConfig.from_pretrained(path))
        model.load_state_dict(read_weights(path), strict=True)
        return model.to(dtype) if dtype is not None else model


def part_classes(config: VLMConfig) -> list[type[nn.Module]]:
    """The classes `from_config` builds for `config`'s parts, their modules imported by the look-up.

    A builder that patches classes while it runs (DeepSpeed's `zero.Init`) must not be the first to import them:
    classes defined inside it come out with the `__init__` they had before their class decorators ran."""
    return [vision_class(config.vision_config), connector_class(config.connector), llm_class(config.text_config)]
