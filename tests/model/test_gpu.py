"""bf16 on CUDA: forward + backward of the tiny VLM, loss close to fp32 (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from vlm_helpers import make_batch, make_model, set_gates

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("connector", ["abstractor", "xattn", "layerwise", "mlp"])
def test_bf16_forward_backward_matches_fp32_loss(connector):
    model = make_model(connector).cuda()
    set_gates(model, 0.5)
    batch = {k: v.cuda() for k, v in make_batch(model, images_per_sample=(2, 1)).items()}
    with torch.no_grad():
        fp32 = model(**batch).loss.item()
    model = model.to(torch.bfloat16).train()
    loss = model(**batch).loss
    loss.backward()
    # bf16 keeps 8 mantissa bits: a ~5.5 nats loss over a 4-layer model lands within 1 % of fp32 (CPU bf16 measured ~1e-4)
    assert abs(loss.item() - fp32) / fp32 < 0.01
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
