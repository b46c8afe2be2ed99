"""Speed switches that must not change the numbers: per-part gradient checkpointing, and the liger fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from vlm_helpers import make_batch, make_model

from mmtrain.config import recipe_from_dict
from mmtrain.errors import UserError
from mmtrain.train.stage_model import apply_liger, enable_checkpointing


def _checkpointing(module) -> bool:
    """transformers 5 renamed the flag; 4.x has only the old name."""
    name = "is_activation_checkpointing" if hasattr(type(module), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(module, name))


def _grads(model) -> dict[str, torch.Tensor]:
    model.train()
    batch = make_batch(model, images_per_sample=(1, 2))
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("parts", [{"llm": True}, {"vision": True}, {"llm": True, "vision": True}])
def test_checkpointing_per_part_gives_the_same_gradients(parts) -> None:
    reference = _grads(make_model())
    model = make_model()
    enable_checkpointing(model, parts)
    assert _checkpointing(model.llm) == bool(parts.get("llm"))
    assert _checkpointing(model.vision.model) == bool(parts.get("vision"))
    grads = _grads(model)
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_recipe_checkpointing_forms() -> None:
    base = {"name": "r", "stages": [{"name": "s", "data": ["x"]}]}
    assert recipe_from_dict({**base, "gradient_checkpointing": True}).checkpointing() == {"vision": True, "llm": True}
    assert recipe_from_dict({**base, "gradient_checkpointing": {"llm": True}}).checkpointing() == {"vision": False,
                                                                                                   "llm": True}
    with pytest.raises(UserError, match="unknown parts"):
        recipe_from_dict({**base, "gradient_checkpointing": {"decoder": True}})
    with pytest.raises(UserError, match="kernels must be plain or liger"):
        recipe_from_dict({**base, "kernels": "triton"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_liger_falls_back_to_plain_modules_with_a_warning() -> None:
    model = make_model()
    before = {n: type(m) for n, m in model.llm.named_modules()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert apply_liger(model) is False
    assert any("kernels: liger" in str(w.message) for w in caught)
    assert {n: type(m) for n, m in model.llm.named_modules()} == before
