"""Non-finite losses and gradients: skip the step (DeepSpeed's own overflow path discards it), count it, and stop
with a report after too many in a row; never save non-finite weights as a complete checkpoint.

A NaN/Inf loss flows into backward on purpose: ZeRO's optimizer checks the global gradient norm, and when it is not
finite it zeroes the gradients and skips the update and the LR step on every rank alike (bf16 needs
`bf16.check_grad_overflow`, which `dsconfig` turns on). We only verify that it did, and keep the books.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mmtrain.errors import UserError


class NonFiniteStop(UserError):
    """The run stops: the policy says so, or too many non-finite steps in a row."""


@dataclass
class NonFiniteGuard:
    policy: str = "skip"
    max_in_row: int = 3
    total: int = 0
    in_row: int = 0
    steps: list[int] = field(default_factory=list)

    def check(self, stage: str, step: int, loss: float, grad_norm: float | None, step_was_skipped: bool,
              keys: list[str], rank: int, loss_scaling: bool = False) -> bool:
        """True when this step was non-finite (and skipped). Raises NonFiniteStop when the run must end.
        With fp16 loss scaling a finite loss whose step was skipped is the scaler probing its scale: not counted."""
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if loss_scaling and math.isfinite(loss) and step_was_skipped:
            return False
        if finite and not step_was_skipped:
            self.in_row = 0
            return False
        self.total += 1
        self.in_row += 1
        self.steps.append(step)
        where = f"stage {stage} step {step}: loss {loss}, gradient norm {grad_norm}; rank {rank}'s batch: {keys}"
        if not step_was_skipped:
            raise NonFiniteStop(f"{where}: the optimizer step was applied despite the non-finite values, so the "
                                "weights cannot be trusted; --resume from the last complete checkpoint")
        if self.policy == "stop":
            raise NonFiniteStop(f"{where}: non-finite (faults.on_nonfinite: stop)")
        if self.in_row >= self.max_in_row:
            raise NonFiniteStop(f"{where}: {self.in_row} non-finite steps in a row (steps {self.steps[-self.in_row:]}, "
                                f"faults.max_nonfinite_in_row {self.max_in_row}); check the data and the lr")
        return True


def local_weights_finite(module: torch.nn.Module) -> bool:
    """Whether this rank's weights are all finite: the local ZeRO-3 partitions (`ds_tensor`), else the tensors."""
    for param in module.parameters():
        tensor = getattr(param, "ds_tensor", None)
        tensor = param.data if tensor is None else tensor
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return False
    return True
