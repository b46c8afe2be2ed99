"""Weights on disk: one safetensors writer (tied tensors once, read back under every name), LoRA merges through peft
for both a live model and a consolidated checkpoint state, and adapter files that round-trip."""

from __future__ import annotations

import torch
from peft import LoraConfig
from safetensors import safe_open

from mmtrain.model.lora import (apply_stage_policy, lora_config_from, merge_lora, read_adapter, split_lora,
                                write_adapter)
from mmtrain.model.weights_io import WEIGHTS_NAME, merged_state_dict, read_weights, save_weights
from vlm_helpers import make_model

LORA = dict(vision=False, connector=False, llm="lora", lora_roles=["self_attn", "ffn"], r=4, alpha=8)


def _lora_model():
    model = make_model("mlp")
    apply_stage_policy(model, **LORA)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_tied_tensors_are_stored_once_and_read_back_under_both_names(tmp_path) -> None:
    table = torch.arange(12.0).reshape(3, 4)
    state = {"embed.weight": table, "head.weight": table, "other": torch.ones(2)}
    save_weights(state, tmp_path / WEIGHTS_NAME)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        assert sorted(handle.keys()) == ["embed.weight", "other"]
    back = read_weights(tmp_path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


def test_a_consolidated_state_merges_as_the_live_model_does(tmp_path) -> None:
    """The export path (a zero_to_fp32 state dict, no model) and the stage hand-off (a live model) fold LoRA in
    through peft and agree; both equal W + B·A·alpha/r computed here by hand."""
    model = _lora_model()
    live = merged_state_dict(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    consolidated = merge_lora(state, lora_config_from({"r": 4, "alpha": 8}, state))
    assert consolidated.keys() == live.keys()
    assert all(torch.allclose(consolidated[k], live[k], atol=1e-6) for k in live)
    name = next(k.removesuffix(".lora_A.default.weight") for k in state if k.endswith(".lora_A.default.weight"))
    a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
    expected = state[f"{name}.base_layer.weight"] + (b @ a) * (8 / 4)
    assert torch.allclose(consolidated[f"{name}.weight"], expected, atol=1e-6)
    assert not torch.allclose(expected, state[f"{name}.base_layer.weight"])
    untouched = [k for k in live if ".layers." not in k]
    assert untouched and all(torch.equal(consolidated[k], state[k]) for k in untouched)


def test_an_adapter_written_from_a_state_reads_back_under_the_live_names(tmp_path) -> None:
    model = _lora_model()
    state = model.state_dict()
    base, adapter = split_lora(state)
    assert not any(".lora_" in k or ".base_layer." in k for k in base)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in adapter)
    write_adapter(adapter, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path)
    config, back = read_adapter(tmp_path)
    assert (config.r, config.lora_alpha) == (4, 8)
    lora_state = {k: v for k, v in state.items() if ".lora_" in k}
    assert back.keys() == lora_state.keys() and all(torch.equal(back[k], v) for k, v in lora_state.items())
