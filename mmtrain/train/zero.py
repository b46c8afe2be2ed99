"""The ZeRO-3 helpers: building a model partitioned, and the one gather helper (and its inverse) for when a whole
tensor is needed.

Under ZeRO-3 each rank holds a slice of every parameter; these helpers gather one module's own parameters at a time,
so no rank ever needs the whole model at once. For ZeRO-0/1/2 (or no DeepSpeed) they are plain reads and writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mmtrain.errors import UserError
from mmtrain.model import VLMConfig, part_classes
from mmtrain.model.loading_report import listing, refuse_unaccounted


def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    import deepspeed  # lazy: doctor imports this module and reports a broken deepspeed as a row, not a crash

    zero3 = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank, enabled=bool(zero3))


def gathered_state_dict(model: nn.Module, rank: int, keep: Callable[[str], bool] = lambda name: True
                        ) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the model's parameters and buffers, on rank 0 only (others get {}). Collective."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)]
        with _gathered([p for _, p in own]):
            if rank == 0:
                for n, p in own:
                    name = f"{prefix}.{n}" if prefix else n
                    if keep(name):
                        state[name] = p.detach().to("cpu", torch.float32, copy=True)
        if rank == 0:
            for n, b in module.named_buffers(recurse=False):
                name = f"{prefix}.{n}" if prefix else n
                if b is not None and keep(name) and n not in getattr(module, "_non_persistent_buffers_set", ()):
                    state[name] = b.detach().to("cpu", copy=True)
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], rank: int, zero3: bool,
              source: str = "the starting weights") -> None:
    """Copy `state` into the (possibly partitioned) model; under ZeRO-3 only rank 0 needs `state`. Collective.

    Every tensor is accounted for: a parameter `state` lacks, a `state` tensor the model has no place for, a shape
    that differs, or two names the model ties holding different tensors stop the load on every rank (rank 0 names
    the tensors), rather than training with a silently dropped or uninitialised weight."""
    reader = rank == 0 or not zero3
    missing, mismatched, used, seen = [], [], set(), set()
    for prefix, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]  # tied: once
        seen.update(id(p) for _, p in own)
        with _gathered([p for _, p in own], modifier_rank=0):
            if reader:
                for n, p in own:
                    name = f"{prefix}.{n}" if prefix else n
                    if name not in state:
                        missing.append(name)
                    elif tuple(state[name].shape) != tuple(p.data.shape):
                        mismatched.append(f"{name} {tuple(state[name].shape)} vs {tuple(p.data.shape)}")
                    else:
                        with torch.no_grad():
                            p.data.copy_(state[name].to(p.dtype))
                    used.add(name)
        for n, buffer in module.named_buffers(recurse=False):
            name = f"{prefix}.{n}" if prefix else n
            if buffer is None or n in module._non_persistent_buffers_set:
                continue
            if reader and name in state:
                buffer.copy_(state[name].to(buffer.dtype))
                used.add(name)
            if zero3 and dist.is_initialized():  # whole on every rank, read by rank 0: every rank joins, every buffer
                dist.broadcast(buffer, 0)
    untied = []
    if reader:
        canonical = {id(p): n for n, p in model.named_parameters()}
        for name, p in model.named_parameters(remove_duplicate=False):
            source_name = canonical[id(p)]
            if name != source_name and name in state:
                used.add(name)
                if source_name in state and not torch.equal(state[name], state[source_name]):
                    untied.append(f"{name} (tied to {source_name})")
    problems = [missing, sorted(set(state) - used) if reader else [], mismatched, untied]
    if zero3 and dist.is_initialized():
        count = torch.tensor([float(sum(map(len, problems)))], device=_device_of(model))
        dist.broadcast(count, 0)
        if count.item() and not reader:
            raise UserError(f"{source}: rank 0 refused them (its error names the tensors)")
    if reader:
        refuse_unaccounted(source, "model", problems[0], problems[1], problems[2])
        if untied:
            raise UserError(f"{source}: the model ties weights the checkpoint holds apart: {listing(untied)}")


def _device_of(model: nn.Module) -> torch.device:
    """Where the process group's collectives run for this model (NCCL needs the GPU, gloo takes the CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _module_classes() -> set[type]:
    found: set[type] = set()
    stack = [nn.Module]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


@contextmanager
def partitioned_build(config: VLMConfig, ds_config: dict[str, Any] | None, enabled: bool) -> Iterator[None]:
    """`deepspeed.zero.Init` around building a model of `config`, its classes imported first.

    While active, DeepSpeed wraps `__init__` of every `nn.Module` subclass, classes defined meanwhile included, and
    on exit puts back the `__init__` it found. A class first defined inside gets its wrapper before its class
    decorators run, so on exit it loses what they added (transformers' kernel hooks: the next model built from it
    lacks `_kernel_funcs`). Hence the model's classes are imported before entering, and on exit a class defined
    inside whose `__init__` did not come back to its own is refused by name, instead of breaking the next build.
    """
    import deepspeed  # lazy: see _gathered

    if not enabled:
        yield
        return
    part_classes(config)  # the look-up imports them
    known = _module_classes()
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=True):
        yield
        inside = {cls: cls.__dict__.get("__init__") for cls in _module_classes() - known}
    broken = [cls for cls, init in inside.items()
              if cls.__dict__.get("__init__") is not getattr(init, "__wrapped__", init)]
    if broken:
        names = ", ".join(sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in broken))
        raise RuntimeError(f"{names}: first defined while deepspeed.zero.Init was active, and leaving it dropped what "
                           "their class decorators added to __init__; import them before the partitioned build "
                           "(mmtrain.model.part_classes names a model's classes)")
