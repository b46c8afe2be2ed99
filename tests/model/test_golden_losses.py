"""Golden losses: each connector's tiny model, fixed weights and batch, 3 AdamW steps, losses equal to recorded values
(1e-5, CPU fp32). Weights are drawn here, parameter by parameter in name order, not by the libraries' initialisers,
so the values pin the forward and backward math of every tested library version rather than their init code."""

from __future__ import annotations

import pytest
import torch

from mmtrain.model.presets import tiny_config
from mmtrain.model.vlm import VisionLanguageModel

from vlm_helpers import adamw_losses, make_batch, set_gates

GOLDEN = {  # the same to 1e-7 under the lock, the floors (transformers 4.57.6) and the newest (torch 2.14.1)
    "abstractor": [5.545027, 5.442229, 5.371741],
    "mlp": [5.616385, 5.521559, 5.451024],
    "xattn": [5.574400, 5.500754, 5.434424],
    "layerwise": [5.550554, 5.461206, 5.400724],
}


def golden_losses(connector: str, steps: int = 3) -> list[float]:
    model = VisionLanguageModel.from_config(tiny_config(connector, layers=2))
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    set_gates(model, 0.5)
    batch = make_batch(model, images_per_sample=(1, 0, 2), text_len=7, seed=5)
    return adamw_losses(model, batch, steps)


@pytest.mark.parametrize("connector", sorted(GOLDEN))
def test_three_steps_reproduce_the_recorded_losses(connector):
    assert golden_losses(connector) == pytest.approx(GOLDEN[connector], abs=1e-5)
