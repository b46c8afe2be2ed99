"""The ZeRO-3 helpers: building a model partitioned, and the one gather helper (and its inverse) for when a whole
tensor is needed.

Under ZeRO-3 each rank holds a slice of every parameter; these helpers gather one module's own parameters at a time,
so no rank ever needs the whole model at once. For ZeRO-0/1/2 (or no DeepSpeed) they are plain reads and writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mmtrain.model import VLMConfig, part_classes


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


def load_into(model: nn.Module, state: dict[str, torch.Tensor], rank: int, zero3: bool) -> list[str]:
    """Copy `state` into the (possibly partitioned) model; under ZeRO-3 only rank 0 needs `state`. Collective.

    Returns the model's parameter names that `state` did not cover (rank 0; the caller decides if that is an error).
    """
    missing: list[str] = []
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with _gathered([p for _, p in own], modifier_rank=0):
            if rank == 0 or not zero3:
                for n, p in own:
                    name = f"{prefix}.{n}" if prefix else n
                    if name in state:
                        with torch.no_grad():
                            p.data.copy_(state[name].to(p.dtype))
                    else:
                        missing.append(name)
    return missing


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
    import deepspeed  # see partitioned_build

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
