"""The composite model's configuration: which parts, how they connect, and derived values.

The LLM and the vision tower keep their own Hugging Face configs (stored as dicts, exactly what their `config.json`
holds), so a real checkpoint of either part can replace the tiny one without translating anything.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtrain.model.connectors import connector_class
from mmtrain.model.vision import vision_geometry

CONFIG_NAME = "config.json"
MODEL_TYPE = "mmtrain_vlm"
HF_LOADING_KEYS = ("architectures", "auto_map")
"""Keys an exported config.json adds for transformers' remote-code loading (`mmtrain.model.remote_code`); not fields."""


@dataclass
class VLMConfig:
    """Vision tower + connector + causal LM. One field, `connector`, decides which published model this is."""

    connector: str = "abstractor"
    """`abstractor` (mPLUG-Owl) | `xattn` (MultiModal-GPT / OpenFlamingo) | `layerwise` (PUMGPT, our reading) | `mlp` (LLaVA)."""
    vision_config: dict[str, Any] = field(default_factory=dict)
    """HF vision config dict; `model_type` is clip_vision_model | siglip_vision_model | vit (or clip / siglip)."""
    text_config: dict[str, Any] = field(default_factory=dict)
    """HF causal-LM config dict (llama, qwen2, mistral, gpt_neox, ...)."""
    image_token_id: int = 0
    """Placeholder token id at an image's slots (for `xattn`, the `<image>` media marker, which is embedded)."""
    vision_select_layer: int = -1
    """Which hidden state of the vision encoder to take: -1 last layer, -2 penultimate (LLaVA)."""
    vision_keep_cls: bool = True
    """Keep the CLS token in the patch features (ignored for encoders without one, e.g. SigLIP)."""
    connector_config: dict[str, Any] = field(default_factory=dict)
    """Options of the chosen connector; validated by that connector's own options dataclass."""
    vision_path: str | None = None
    """Local directory of a pretrained vision checkpoint, loaded by `build_model(..., pretrained=True)`."""
    llm_path: str | None = None
    """Local directory of a pretrained causal-LM checkpoint, loaded by `build_model(..., pretrained=True)`."""

    def __post_init__(self) -> None:
        connector_class(self.connector)  # raises on an unknown name, listing the known ones
        if not self.vision_config.get("model_type"):
            raise ValueError("vision_config needs a model_type (clip_vision_model, siglip_vision_model, vit)")
        if not self.text_config.get("model_type"):
            raise ValueError("text_config needs a model_type (llama, qwen2, gpt_neox, ...)")
        if self.vision_select_layer >= 0:
            raise ValueError(f"vision_select_layer counts from the end (-1 last, -2 penultimate), got {self.vision_select_layer}")
        self.connector_options()  # validate the connector's options now, not at first forward

    # ---- derived values -------------------------------------------------------------------------------------------
    def connector_options(self) -> Any:
        """The connector's typed options (its dataclass) built from `connector_config`."""
        return connector_class(self.connector).options_class(**self.connector_config)

    def num_image_slots(self) -> int:
        """Tokens each image occupies in the text: 65 abstractor, patches (+CLS) mlp, 1 xattn, 0 layerwise."""
        return connector_class(self.connector).num_slots(self)

    def vision_geometry(self) -> tuple[int, bool, int]:
        """(patches per image, whether a CLS token leads them, vision hidden size), from the config alone."""
        return vision_geometry(self.vision_config)

    def num_vision_tokens(self) -> int:
        """Feature tokens per image the vision tower returns (patches, plus CLS when kept and present)."""
        patches, has_cls, _ = self.vision_geometry()
        return patches + int(has_cls and self.vision_keep_cls)

    @property
    def llm_hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def llm_num_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    # ---- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        data = {k: v for k, v in data.items() if k not in HF_LOADING_KEYS}
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"not an mmtrain VLM config: model_type={model_type!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VLM config fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save_pretrained(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VLMConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a saved mmtrain VLM directory)")
        return cls.from_dict(json.loads(path.read_text()))


def num_image_slots(config: VLMConfig) -> int:
    """Slots per image for the data templates, from a config alone (no weights built)."""
    return config.num_image_slots()
