"""FLOP counts against hand-computed values (owl-7b, tiny), stage factors, batch lengths, the peak table."""

from __future__ import annotations

import pytest
import torch

from mmtrain.model import VisionLanguageModel, preset_config
from mmtrain.model.lora import apply_stage_policy
from mmtrain.train.flops import batch_lengths, forward_flops_per_image, linear_weights, peak_flops, stage_flop_model

LLAMA_7B_N = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000  # attention + MLP per layer, lm_head
CLIP_L14_FWD = (2 * 257 * 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096)  # q, k, v, o, fc1, fc2 over 257 tokens
                + 4 * 24 * 1024 * 257 * 257  # QKᵀ and AV
                + 2 * 256 * (3 * 14 * 14) * 1024)  # patch embedding


def _meta(name: str):
    config = preset_config(name)
    with torch.device("meta"):
        return VisionLanguageModel.from_config(config, pretrained=False), config


def test_owl_7b_counts_match_hand_computed_values() -> None:
    model, config = _meta("owl-7b")
    assert LLAMA_7B_N == 6_607_077_376
    assert linear_weights(model.llm) == (LLAMA_7B_N, 0)
    vision, connector = forward_flops_per_image(config)
    assert vision == pytest.approx(CLIP_L14_FWD, rel=1e-4)
    assert connector > 0

    # stage 2: LoRA r=8 on q and v of all 32 layers; vision and abstractor frozen
    with torch.device("meta"):
        apply_stage_policy(model, vision=False, connector=False, llm="lora", lora_roles=["self_attn"], r=8)
    base, lora = linear_weights(model.llm)
    assert base == LLAMA_7B_N
    fm = stage_flop_model(model, config, vision=False, connector=False, llm="lora")
    assert (fm.llm_factor, fm.vision_factor, fm.connector_factor) == (4, 1.0, 1.0)
    s = 2048  # one text sample of 2,048 tokens: 4N·S + 6·N_lora·S + 12·L·h·S²
    assert fm.step_flops(s, s * s, 0) == 4 * LLAMA_7B_N * s + 6 * lora * s + 12 * 32 * 4096 * s * s
    # the same sample with its image: + the frozen tower and abstractor forward, once each
    assert fm.step_flops(s, s * s, 1) - fm.step_flops(s, s * s, 0) == pytest.approx(vision + connector)


def test_tiny_counts_and_stage_factors() -> None:
    model, config = _meta("tiny")
    t = config.text_config
    h, i, layers, v = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    kv = h // t["num_attention_heads"] * t["num_key_value_heads"]
    hand = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v
    assert linear_weights(model.llm) == (hand, 0)

    stage1 = stage_flop_model(model, config, vision=True, connector=True, llm="frozen")
    assert (stage1.llm_factor, stage1.vision_factor, stage1.connector_factor) == (4, 3.0, 3.0)
    full = stage_flop_model(model, config, vision=False, connector=False, llm="full")
    assert (full.llm_factor, full.vision_factor, full.connector_factor) == (6, 1.0, 1.0)
    last = stage_flop_model(model, config, vision=1, connector=False, llm="frozen")
    vl = config.vision_config["num_hidden_layers"]
    assert last.vision_factor == pytest.approx(1 + 2 / vl) and last.connector_factor == 2.0
    # two samples of 10 and 30 tokens, one image
    assert full.step_flops(40, 100 + 900, 1) == (40 * 6 * hand + 12 * layers * h * 1000
                                                  + full.vision_per_image + full.connector_per_image)


def test_batch_lengths_padded_and_packed() -> None:
    padded = {"input_ids": torch.zeros(2, 8), "attention_mask": torch.tensor([[1] * 5 + [0] * 3, [1] * 8])}
    assert batch_lengths(padded) == (13, 25 + 64)
    packed = {"input_ids": torch.zeros(2, 8), "attention_mask": torch.ones(2, 8),
              "segment_ids": torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 2]])}
    assert batch_lengths(packed) == (3 + 2 + 7 + 1, 9 + 4 + 49 + 1)


def test_peak_table_and_override() -> None:
    assert peak_flops(torch.device("cpu"), "fp32") is None
    assert peak_flops(torch.device("cpu"), "fp32", override_tflops=2.5) == 2.5e12
