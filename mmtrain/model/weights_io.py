"""Model weights as safetensors files, in one place: tied tensors stored once and read back under every name, and a
live model's state with its LoRA deltas folded in (by peft's own `get_delta_weight`).

This module imports no peft, so the model code that travels inside an exported directory loads without it; LoRA
merges of consolidated checkpoints and adapter files live in `mmtrain.model.lora`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmtrain.errors import UserError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


# ---- safetensors -------------------------------------------------------------------------------------------------
def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `state` to one safetensors file. Tensors sharing storage (tied embeddings / LM head) are stored once
    and the other names listed under the `aliases` metadata entry, which `read_weights` expands."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.device.type != "meta" else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """A model directory's tensors by name, tied weights (stored once, listed as aliases) under every name."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights")
    with safe_open(str(weights), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(weights))
    state.update({alias: state[source] for alias, source in aliases.items()})
    return state


def safetensors_files(folder: str | Path, what: str = "model") -> list[Path]:
    """A HF directory's safetensors files: `model.safetensors`, or every shard its index names."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    raise UserError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX} (mmtrain reads {what} weights from safetensors; "
                    "re-save a pytorch_model.bin directory with save_pretrained)")


# ---- LoRA merge ----------------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in `model`, known by peft's layer interface (`get_delta_weight`,
    `merged`, `get_base_layer`), so that saving a model needs no peft import."""
    return [(n, m) for n, m in model.named_modules()
            if all(hasattr(m, a) for a in ("get_delta_weight", "merged", "get_base_layer", "active_adapters"))]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A live model's state dict with each LoRA delta (peft's `get_delta_weight`) folded into its base weight and
    peft's names removed; the model itself is left as it is."""
    state = model.state_dict()
    layers = dict(lora_layers(model))
    if not layers:
        return state
    out = {key.replace(".base_layer.", "."): tensor for key, tensor in state.items() if ".lora_" not in key}
    for name, layer in layers.items():
        if not layer.merged:
            weight = out[f"{name}.weight"]
            out[f"{name}.weight"] = weight + sum(layer.get_delta_weight(a).to(weight.dtype)
                                                 for a in layer.active_adapters)
    return out
