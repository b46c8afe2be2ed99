"""The one ZeRO-3 gather helper (and its inverse): full parameters when a whole tensor is needed.

Under ZeRO-3 each rank holds a slice of every parameter; these helpers gather one module's own parameters at a time,
so no rank ever needs the whole model at once. For ZeRO-0/1/2 (or no DeepSpeed) they are plain reads and writes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    import deepspeed

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
