"""Freeze policy per stage and LoRA by role (peft), with trainable counts by part and a peft-format adapter.

Parts are the model's top-level children: `vision`, `connector` (xattn / layer-wise blocks included), `llm`. LoRA
parameters count under the part whose module they adapt. Roles map to module names per architecture family:

| role       | LLaMA / Mistral / Qwen2 / Qwen3         | GPT-NeoX                            | connector                         |
|------------|-----------------------------------------|-------------------------------------|-----------------------------------|
| self_attn  | self_attn.{q,k,v,o}_proj                | attention.{query_key_value,dense}   | -                                 |
| ffn        | mlp.{gate,up,down}_proj                 | mlp.{dense_h_to_4h,dense_4h_to_h}   | xattn FFN fc1/fc2                 |
| cross_attn | -                                       | -                                   | xattn to_q/to_kv/to_out, abstractor q/k/v/o |
| vision     | CLIP / SigLIP: self_attn.{q,k,v,out}_proj, mlp.fc{1,2}; ViT: attention query/key/value/output, intermediate/output dense |
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

PARTS = ("vision", "connector", "llm")
ROLES = ("self_attn", "cross_attn", "ffn", "vision")
LLM_MODES = ("frozen", "lora", "full")
ADAPTER = "default"
EXTRA_WEIGHTS = "non_lora_trainables.safetensors"

_LLAMA = {"self_attn": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)", "ffn": r"mlp\.(gate_proj|up_proj|down_proj)"}
LLM_ROLE_PATTERNS: dict[str, dict[str, str]] = {
    **{family: _LLAMA for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")},
    "gpt_neox": {"self_attn": r"attention\.(query_key_value|dense)", "ffn": r"mlp\.(dense_h_to_4h|dense_4h_to_h)"},
}
VISION_ROLE_PATTERN = (  # CLIP / SigLIP / ViT, under transformers 4.x and 5.x names
    r"(self_attn|attention)\.(q_proj|k_proj|v_proj|out_proj|o_proj)|mlp\.(fc1|fc2)"
    r"|attention\.attention\.(query|key|value)|attention\.output\.dense|intermediate\.dense|layer\.\d+\.output\.dense"
)


def part_of(name: str) -> str:
    part = name.split(".", 1)[0]
    if part not in PARTS:
        raise ValueError(f"parameter {name!r} belongs to no part {PARTS}")
    return part


def _linear_names(module: nn.Module, prefix: str, pattern: str) -> list[str]:
    regex = re.compile(rf"(^|\.)({pattern})$")
    return [f"{prefix}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear) and regex.search(n)]


def lora_target_names(model: nn.Module, roles: Iterable[str], llm_lora: bool, connector_frozen: bool) -> list[str]:
    """Full module names (from the model root) that the given roles adapt."""
    targets: list[str] = []
    family = model.config.text_config["model_type"]
    for role in roles:
        if role in ("self_attn", "ffn") and llm_lora:
            if family not in LLM_ROLE_PATTERNS:
                raise ValueError(f"no LoRA role names for LLM family {family!r}; known: {sorted(LLM_ROLE_PATTERNS)}")
            targets += _linear_names(model.llm, "llm", LLM_ROLE_PATTERNS[family][role])
        if role in ("cross_attn", "ffn") and connector_frozen:
            targets += [f"connector.{n}" for n in model.connector.lora_targets(role)]
        if role == "vision":
            targets += _linear_names(model.vision.model, "vision.model", VISION_ROLE_PATTERN)
    return sorted(set(targets))


def _validate(vision: bool | int, llm: str, roles: list[str], connector: bool) -> None:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown LoRA roles {unknown}; known roles: {list(ROLES)}")
    if llm not in LLM_MODES:
        raise ValueError(f"llm must be one of {list(LLM_MODES)}, got {llm!r}")
    if llm == "lora" and not {"self_attn", "ffn"} & set(roles):
        raise ValueError("llm: lora needs at least one of the LLM roles self_attn / ffn in lora_roles")
    if llm != "lora" and "self_attn" in roles:
        raise ValueError(f"LoRA role self_attn adapts the LLM, but llm is {llm!r} (use llm: lora)")
    if "cross_attn" in roles and connector:
        raise ValueError("LoRA role cross_attn adapts the connector, which this stage trains fully (connector: true)")
    if "vision" in roles and vision is not False:
        raise ValueError(f"LoRA role vision adapts the vision tower, which this stage trains (vision: {vision})")


def apply_stage_policy(model: nn.Module, vision: bool | int = False, connector: bool = True, llm: str = "frozen",
                       lora_roles: Iterable[str] = (), r: int = 8, alpha: int = 16, dropout: float = 0.0) -> dict[str, int]:
    """Freeze everything, check nothing trains, then open what the stage names. Returns trainable counts by part.

    vision: True (all), False (none) or N (last N encoder layers). llm: frozen | lora | full. LoRA adapters of a
    previous stage are merged into the base weights first, so stage N+1 starts from stage N's weights.
    """
    roles = list(lora_roles)
    _validate(vision, llm, roles, connector)
    unload_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters()), "freeze failed"
    targets = lora_target_names(model, roles, llm == "lora", not connector)
    if roles and not targets:
        raise ValueError(f"LoRA roles {roles} match no module of this model (connector {model.config.connector!r})")
    if targets:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        model.lora_config = config
    unused = set(model.vision.unused_parameter_names())
    if vision is True:
        for n, p in model.vision.named_parameters():
            p.requires_grad_(n not in unused)
    elif not isinstance(vision, bool) and vision > 0:
        for p in model.vision.encoder_layers()[-int(vision):].parameters():
            p.requires_grad_(True)
    if connector:
        for p in model.connector.parameters():
            p.requires_grad_(True)
    if llm == "full":
        for p in model.llm.parameters():
            p.requires_grad_(True)
    return trainable_counts(model)


def trainable_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by part, so the trainer can give each part its own learning rate."""
    groups: dict[str, list[nn.Parameter]] = {part: [] for part in PARTS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[part_of(name)].append(p)
    return groups


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions keep the full size in ds_numel


def trainable_counts(model: nn.Module) -> dict[str, int]:
    return {part: sum(_numel(p) for p in params) for part, params in trainable_parameter_groups(model).items()}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """All parameters by part (tied weights counted once), plus `total`."""
    counts = {part: 0 for part in PARTS}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            counts[part_of(name)] += _numel(p)
    counts["total"] = sum(counts.values())
    return counts


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with LoRA deltas folded into the base weights and peft's names removed."""
    state = model.state_dict()
    layers = dict(_lora_layers(model))
    if not layers:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = tensor
    for name, layer in layers.items():
        if not layer.merged:
            weight = out[f"{name}.weight"]
            out[f"{name}.weight"] = weight + sum(layer.get_delta_weight(a).to(weight.dtype) for a in layer.active_adapters)
    return out


def unload_lora(model: nn.Module) -> None:
    """Merge every LoRA adapter into its base layer and put the plain base layer back (no peft modules left)."""
    for name, layer in _lora_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "lora_config"):
        del model.lora_config


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """peft's format (adapter_config.json + adapter_model.safetensors), loadable by `peft.PeftModel.from_pretrained`.

    Trainable weights that are not LoRA (e.g. a connector trained fully in the same stage) go beside it in
    `non_lora_trainables.safetensors` so they are never lost with the adapter; `load_adapter` restores both.
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapter (apply_stage_policy with lora_roles first)")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    lora = {}
    for key, tensor in model.state_dict().items():
        if ".lora_" in key:
            lora["base_model.model." + key.replace(f".{ADAPTER}.", ".").replace(f".{ADAPTER}", "")] = tensor.detach().contiguous().cpu()
    save_file(lora, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    extra = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    if extra:
        save_file(extra, str(path / EXTRA_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Inject the saved adapter into `model` (ours, not a PeftModel) and restore the non-LoRA trainables."""
    path = Path(directory)
    config = LoraConfig.from_pretrained(str(path))
    unload_lora(model)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.lora_config = config
    state = {}
    for key, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        key = key.removeprefix("base_model.model.")
        stem, _, leaf = key.rpartition(".")  # ...q_proj.lora_A.weight -> ...q_proj.lora_A.default.weight
        state[f"{stem}.{ADAPTER}.{leaf}"] = tensor
    if (path / EXTRA_WEIGHTS).is_file():
        state.update(load_file(str(path / EXTRA_WEIGHTS)))
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise ValueError(f"{path}: adapter weights {missing[:3]} ... do not match this model")
    model.load_state_dict(state, strict=False)
