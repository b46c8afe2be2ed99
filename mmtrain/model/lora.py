"""Freeze policy per stage and LoRA by role (peft), with trainable counts by part; LoRA weights on disk: merged into
a consolidated checkpoint state through peft, and peft-format adapters.

Parts are the model's top-level children: `vision`, `connector` (xattn / layer-wise blocks included), `llm`. LoRA
parameters count under the part whose module they adapt. A role names blocks, not projection names, so it holds for
every family, fused projections included:

| role       | what it adapts                                                                                   |
|------------|--------------------------------------------------------------------------------------------------|
| self_attn  | every linear layer of each decoder layer's attention block (`self_attn`, `attention`, `attn`): LLaMA's q/k/v/o_proj, Phi-3's qkv_proj + o_proj, GPT-NeoX's query_key_value + dense |
| ffn        | every linear layer of each decoder layer's MLP block (`mlp`, `feed_forward`): gate/up/down_proj, Phi-3's gate_up_proj + down_proj; and the xattn connector's FFN |
| cross_attn | the connector's attention: xattn to_q/to_kv/to_out, abstractor q/k/v/o                           |
| vision     | the vision encoder's attention and MLP linears (CLIP / SigLIP / ViT)                             |

A role that adapts nothing in this model is an error naming the modules it looked at.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from mmtrain.errors import UserError
from mmtrain.model.llm import decoder_layers
from mmtrain.model.weights_io import lora_layers

PARTS = ("vision", "connector", "llm")
ROLES = ("self_attn", "cross_attn", "ffn", "vision")
LLM_MODES = ("frozen", "lora", "full")
EXTRA_WEIGHTS = "non_lora_trainables.safetensors"
ADAPTER = "default"
"""peft's adapter name; it appears inside state-dict keys (`….lora_A.default.weight`) and not in adapter files."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

ATTENTION_BLOCKS = ("self_attn", "attention", "attn", "self_attention")
FFN_BLOCKS = ("mlp", "feed_forward", "ffn")
LLM_ROLE_BLOCKS = {"self_attn": ATTENTION_BLOCKS, "ffn": FFN_BLOCKS}
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


def llm_role_targets(llm: nn.Module, role: str) -> list[str]:
    """Module names (relative to the LLM) of every linear layer in each decoder layer's block for `role`."""
    names = {id(m): n for n, m in llm.named_modules()}
    blocks = LLM_ROLE_BLOCKS[role]
    targets: list[str] = []
    for i, layer in enumerate(decoder_layers(llm)):
        found = next((b for b in blocks if isinstance(getattr(layer, b, None), nn.Module)), None)
        if found is None:
            children = [n for n, _ in layer.named_children()]
            raise UserError(f"LoRA role {role}: decoder layer {i} ({type(layer).__name__}) has no "
                            f"{' / '.join(blocks)} block; its modules: {children}")
        block = getattr(layer, found)
        targets += [f"{names[id(block)]}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    return targets


def lora_target_names(model: nn.Module, roles: Iterable[str], llm_lora: bool, connector_frozen: bool) -> list[str]:
    """Full module names (from the model root) that the given roles adapt. A role that adapts nothing here is a
    UserError naming the linear modules of the part it looked in."""
    targets: list[str] = []
    for role in roles:
        found: list[str] = []
        if role in LLM_ROLE_BLOCKS and llm_lora:
            found += [f"llm.{n}" for n in llm_role_targets(model.llm, role)]
        if role in ("cross_attn", "ffn") and connector_frozen:
            found += [f"connector.{n}" for n in model.connector.lora_targets(role)]
        if role == "vision":
            found += _linear_names(model.vision.model, "vision.model", VISION_ROLE_PATTERN)
        if not found and (role == "vision" or (role == "cross_attn" and connector_frozen)):
            part = "vision" if role == "vision" else "connector"
            seen = [n for n, m in getattr(model, part).named_modules() if isinstance(m, nn.Linear)]
            raise UserError(f"LoRA role {role} adapts no module of this model's {part} "
                            f"({type(getattr(model, part)).__name__}); its linear modules: {_sample(seen)}")
        targets += found
    return sorted(set(targets))


def _sample(names: list[str], shown: int = 12) -> str:
    return ", ".join(names[:shown]) + (f", … ({len(names)} in all)" if len(names) > shown else "") if names else "none"


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


def unload_lora(model: nn.Module) -> None:
    """Merge every LoRA adapter into its base layer and put the plain base layer back (no peft modules left)."""
    for name, layer in lora_layers(model):
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
    lora = {adapter_key(k): t for k, t in model.state_dict().items() if ".lora_" in k}
    write_adapter(lora, config, path)
    extra = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    if extra:
        save_file(extra, str(path / EXTRA_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Inject the saved adapter into `model` (ours, not a PeftModel) and restore the non-LoRA trainables."""
    path = Path(directory)
    config, state = read_adapter(path)
    unload_lora(model)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.lora_config = config
    if (path / EXTRA_WEIGHTS).is_file():
        state.update(load_file(str(path / EXTRA_WEIGHTS)))
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise ValueError(f"{path}: adapter weights {missing[:3]} ... do not match this model")
    model.load_state_dict(state, strict=False)


# ---- LoRA weights on disk: merged into a consolidated state, or as peft adapter files ----------------------------
def lora_module_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the modules a state dict holds LoRA pairs for."""
    return sorted({key.split(".lora_A.")[0] for key in state if ".lora_A." in key})


def lora_config_from(options: dict[str, Any], state: dict[str, torch.Tensor]) -> LoraConfig:
    """peft's LoraConfig for a checkpoint's stage options (r, alpha, dropout) and the modules its state adapts."""
    return LoraConfig(r=int(options["r"]), lora_alpha=options["alpha"], lora_dropout=options.get("dropout", 0.0),
                      target_modules=lora_module_names(state), bias="none")


def _linears_like(state: dict[str, torch.Tensor], modules: list[str]) -> nn.Module:
    """An empty module tree with a plain nn.Linear at each of `modules`, shaped as the state's base weights."""
    root = nn.Module()
    for name in modules:
        weight = state[f"{name}.base_layer.weight"]
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        bias = f"{name}.base_layer.bias" in state
        parent.add_module(leaf, nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device="meta"))
    return root


def merge_lora(state: dict[str, torch.Tensor], config: LoraConfig) -> dict[str, torch.Tensor]:
    """A consolidated state dict with peft's LoRA layers (`….base_layer.weight`, `….lora_A.default.weight`) folded
    into plain weights. peft merges: its layers are injected into a tree of the adapted linears alone (no copy of
    the rest of the model), loaded with the state's tensors and merged with `merge()`."""
    modules = lora_module_names(state)
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    if not modules:
        return merged
    tree = inject_adapter_in_model(config, _linears_like(state, modules), adapter_name=ADAPTER)
    own = {k: v for k, v in state.items() if k.split(".base_layer.")[0].split(".lora_")[0] in set(modules)}
    tree.load_state_dict({k: v.float() for k, v in own.items()}, strict=True, assign=True)
    for name, layer in lora_layers(tree):
        layer.merge(safe_merge=True)
        dtype = merged[f"{name}.weight"].dtype
        merged[f"{name}.weight"] = layer.get_base_layer().weight.detach().to(dtype)
    return merged


def split_lora(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights under plain names, LoRA weights under peft's adapter-file names)."""
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    adapter = {adapter_key(k): v for k, v in state.items() if ".lora_" in k}
    return base, adapter


def adapter_key(state_key: str) -> str:
    """A live LoRA tensor's name as peft's adapter file spells it: the adapter name dropped, peft's prefix added."""
    return PEFT_PREFIX + state_key.replace(f".{ADAPTER}.", ".").removesuffix(f".{ADAPTER}")


def state_key(adapter_key_: str) -> str:
    """The inverse of `adapter_key`: `base_model.model.….lora_A.weight` → `….lora_A.default.weight`."""
    stem, _, leaf = adapter_key_.removeprefix(PEFT_PREFIX).rpartition(".")
    return f"{stem}.{ADAPTER}.{leaf}"


def write_adapter(adapter: dict[str, torch.Tensor], config: LoraConfig, out: str | Path) -> None:
    """peft's adapter format (adapter_config.json + adapter_model.safetensors), loadable by
    `peft.PeftModel.from_pretrained`; `adapter` is keyed by `adapter_key` names."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors, keyed as a live model's state dict names them."""
    path = Path(directory)
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    return LoraConfig.from_pretrained(str(path)), {state_key(k): v for k, v in tensors.items()}
