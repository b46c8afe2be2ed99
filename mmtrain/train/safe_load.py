"""No pickle across a trust boundary: DeepSpeed's checkpoint files are read with `torch.load(weights_only=True)`.

DeepSpeed's own `TorchCheckpointEngine.load` passes `weights_only=False`, which runs arbitrary code from a
checkpoint someone handed you. Its files hold only tensors, numbers, strings and a few DeepSpeed / torch
enums and config types; those are allowed by name, anything else is refused with the file named.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _allowed_globals() -> list[Any]:
    allowed: list[Any] = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    """`torch.load` that refuses anything but tensors, containers and the DeepSpeed types listed above."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch's UnpicklingError text says which global was refused
        raise RuntimeError(f"{path}: refused to load a checkpoint file that is not plain tensors and numbers "
                           f"(weights_only=True): {exc}") from exc


def use_safe_loading(engine: Any) -> None:
    """Swap the engine's torch checkpoint engine for one whose `load` is `safe_torch_load`."""
    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is TorchCheckpointEngine:
        current.load = lambda path, map_location=None: safe_torch_load(path, map_location)
