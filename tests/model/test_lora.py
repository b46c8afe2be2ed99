"""Freeze policy per stage, LoRA by role, trainable counts by part, and the peft-format adapter."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from mmtrain.model.lora import (apply_stage_policy, lora_target_names, part_of, save_adapter, load_adapter,
                                trainable_parameter_groups)
from mmtrain.model.vlm import VisionLanguageModel
from vlm_helpers import make_batch, make_model, set_gates

STAGES = {
    "connector_only": dict(vision=False, connector=True, llm="frozen"),
    "lora_llm_last_vision_layer": dict(vision=1, connector=True, llm="lora", lora_roles=["self_attn", "ffn"], r=4, alpha=8),
    "full_llm_frozen_connector": dict(vision=False, connector=False, llm="full"),
    "vision_lora_only": dict(vision=False, connector=False, llm="frozen", lora_roles=["vision"], r=2),
    "cross_attn_lora": dict(vision=True, connector=False, llm="lora", lora_roles=["cross_attn", "self_attn"], r=2),
}
EXPECTED_PARTS = {
    "connector_only": {"connector"},
    "lora_llm_last_vision_layer": {"vision", "connector", "llm"},
    "full_llm_frozen_connector": {"llm"},
    "vision_lora_only": {"vision"},
    "cross_attn_lora": {"vision", "connector", "llm"},
}


def _lora_b_nonzero(model, seed=3):
    """LoRA's B starts at zero; give it values so that adapters change the logits (and tests can fail)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("connector", ["abstractor", "xattn"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_gradients_reach_exactly_the_trainable_parts(connector, stage):
    model = make_model(connector)
    set_gates(model, 0.5)
    counts = apply_stage_policy(model, **STAGES[stage])
    _lora_b_nonzero(model)
    model.train()
    batch = make_batch(model, images_per_sample=(1, 2))
    model(**batch).loss.backward()
    grad_by_part = {"vision": 0.0, "connector": 0.0, "llm": 0.0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable but got no gradient"
            grad_by_part[part_of(name)] += float(p.grad.abs().sum())
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"
    assert {part for part, g in grad_by_part.items() if g > 0} == EXPECTED_PARTS[stage]
    groups = trainable_parameter_groups(model)
    assert counts == {part: sum(p.numel() for p in params) for part, params in groups.items()}
    assert {part for part, n in counts.items() if n} == EXPECTED_PARTS[stage]


def test_vision_last_n_layers_opens_only_those_layers():
    model = make_model("mlp")
    apply_stage_policy(model, vision=1, connector=False, llm="frozen")
    trainable = {id(p) for p in model.vision.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.vision.encoder_layers()[-1].parameters()}
    assert len(model.vision.encoder_layers()) == 2


def test_role_names_per_family():
    llama = make_model("xattn")
    names = lora_target_names(llama, ["self_attn"], llm_lora=True, connector_frozen=True)
    assert "llm.model.layers.0.self_attn.q_proj" in names and "llm.model.layers.3.self_attn.o_proj" in names
    assert len(names) == 4 * 4
    ffn = lora_target_names(llama, ["ffn"], llm_lora=True, connector_frozen=True)
    assert "llm.model.layers.2.mlp.down_proj" in ffn and "connector.blocks.1.ff.fc2" in ffn and len(ffn) == 4 * 3 + 2 * 2
    cross = lora_target_names(llama, ["cross_attn"], llm_lora=False, connector_frozen=True)
    assert cross == sorted(f"connector.blocks.{j}.attn.{p}" for j in (0, 1) for p in ("to_q", "to_kv", "to_out"))
    neox = make_model("mlp", llm_family="gpt_neox")
    names = lora_target_names(neox, ["self_attn", "ffn"], llm_lora=True, connector_frozen=False)
    assert "llm.gpt_neox.layers.0.attention.query_key_value" in names and "llm.gpt_neox.layers.0.mlp.dense_4h_to_h" in names
    assert len(names) == 4 * 4
    qwen = make_model("mlp", llm_family="qwen2")
    assert len(lora_target_names(qwen, ["self_attn"], llm_lora=True, connector_frozen=False)) == 4 * 4
    vision = lora_target_names(qwen, ["vision"], llm_lora=False, connector_frozen=False)
    assert any(n.endswith("layers.0.self_attn.out_proj") for n in vision) and len(vision) == 2 * 6


def test_policy_rejects_inconsistent_stages():
    model = make_model("abstractor")
    with pytest.raises(ValueError, match=r"unknown LoRA roles \['mlp'\]"):
        apply_stage_policy(model, llm="lora", lora_roles=["mlp"])
    with pytest.raises(ValueError, match="llm: lora needs"):
        apply_stage_policy(model, llm="lora", lora_roles=[])
    with pytest.raises(ValueError, match="use llm: lora"):
        apply_stage_policy(model, llm="full", lora_roles=["self_attn"])


@pytest.mark.parametrize("connector, family", [("abstractor", "llama"), ("xattn", "qwen2")])
def test_adapter_loads_with_peft_and_gives_identical_logits(tmp_path, connector, family):
    model = make_model(connector, llm_family=family)
    set_gates(model, 0.5)
    model.save_pretrained(tmp_path / "base")
    apply_stage_policy(model, connector=False, llm="lora", lora_roles=["self_attn", "ffn"], r=4, alpha=8)
    _lora_b_nonzero(model)
    model.eval()
    batch = {k: v for k, v in make_batch(model, images_per_sample=(1, 1)).items() if k != "labels"}
    with torch.no_grad():
        expected = model(**batch).logits
        base_logits = VisionLanguageModel.from_pretrained(tmp_path / "base").eval()(**batch).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter matters
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = VisionLanguageModel.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=0, atol=1e-6)
    # our own loader, and a merged save, agree too
    ours = VisionLanguageModel.from_pretrained(tmp_path / "base")
    load_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**batch).logits, expected, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "merged")
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_adapter_keeps_the_fully_trained_connector(tmp_path):
    """LLaVA's lost-projector bug: a connector trained beside LoRA must travel with the adapter."""
    model = make_model("mlp")
    model.save_pretrained(tmp_path / "base")
    apply_stage_policy(model, connector=True, llm="lora", lora_roles=["self_attn"], r=2)
    with torch.no_grad():
        for p in model.connector.parameters():
            p.add_(0.05)
    save_adapter(model, tmp_path / "adapter")
    restored = VisionLanguageModel.from_pretrained(tmp_path / "base")
    load_adapter(restored, tmp_path / "adapter")
    for (name, p), q in zip(model.connector.named_parameters(), restored.connector.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_next_stage_merges_the_previous_adapter():
    model = make_model("abstractor")
    apply_stage_policy(model, llm="lora", lora_roles=["self_attn"], r=2)
    _lora_b_nonzero(model)
    batch = {k: v for k, v in make_batch(model).items() if k != "labels"}
    with torch.no_grad():
        before = model.eval()(**batch).logits
    counts = apply_stage_policy(model, connector=False, llm="full")
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert counts["llm"] == sum(p.numel() for p in model.llm.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-5)


def test_roles_cover_fused_projections_phi3():
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the roles adapt them whole, none missed."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from mmtrain.model.lora import llm_role_targets

    llm = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    assert llm_role_targets(llm, "self_attn") == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                  for p in ("o_proj", "qkv_proj")]
    assert llm_role_targets(llm, "ffn") == [f"model.layers.{i}.mlp.{p}" for i in (0, 1)
                                            for p in ("gate_up_proj", "down_proj")]


def test_a_role_that_adapts_nothing_names_what_it_saw():
    from mmtrain.errors import UserError
    from mmtrain.model.llm import decoder_layers
    from mmtrain.model.lora import llm_role_targets

    mlp = make_model("mlp")
    with pytest.raises(UserError, match=r"LoRA role cross_attn adapts no module of this model's connector "
                                        r"\(MLPConnector\); its linear modules: proj\.0, proj\.2$"):
        lora_target_names(mlp, ["cross_attn"], llm_lora=False, connector_frozen=True)
    layer = decoder_layers(mlp.llm)[0]
    layer.mixer = layer.self_attn  # a family whose attention block has another name
    del layer.self_attn
    with pytest.raises(UserError) as caught:
        llm_role_targets(mlp.llm, "self_attn")
    assert str(caught.value) == ("LoRA role self_attn: decoder layer 0 (LlamaDecoderLayer) has no self_attn / "
                                 "attention / attn / self_attention block; its modules: ['mlp', 'input_layernorm', "
                                 "'post_attention_layernorm', 'mixer']")
