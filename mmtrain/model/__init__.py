"""mmtrain.model: vision tower + connector + HF causal LM, the freeze / LoRA policy per stage, and presets.

Never imports deepspeed or torch.distributed: the trainer wraps the model from outside.
"""

from mmtrain.model.config import VLMConfig, num_image_slots
from mmtrain.model.lora import (apply_stage_policy, load_adapter, parameter_counts, save_adapter, trainable_counts,
                                trainable_parameter_groups)
from mmtrain.model.presets import PRESETS, build_preset, preset_config, summarize, tiny_config
from mmtrain.model.vlm import VisionLanguageModel, part_classes

__all__ = [
    "PRESETS", "VLMConfig", "VisionLanguageModel", "apply_stage_policy", "build_preset", "load_adapter", "num_image_slots",
    "parameter_counts", "part_classes", "preset_config", "save_adapter", "summarize", "tiny_config", "trainable_counts",
    "trainable_parameter_groups",
]
