"""The per-GPU memory estimator's arithmetic (checked against measured peaks only on a GPU: issue #9)."""

from __future__ import annotations

import pytest

from mmtrain.cli import main as cli_main
from mmtrain.model import preset_config
from mmtrain.model.memory import GIB, StageShape, estimate, stage_estimate

LLAMA_LAYER_BYTES = 2 * (6 * 4096 + 2 * 4096) + 6 * 11008  # per token per decoder layer


def _owl_stage2(**shape) -> tuple:
    config = preset_config("owl-7b")
    return config, stage_estimate(config, vision=False, connector=False, llm="lora", lora_roles=["self_attn"], r=8,
                                  shape=StageShape(**shape))


def test_zero3_partitions_model_states_and_activations_do_not_shrink() -> None:
    _, eight = _owl_stage2(gpus=8, zero_stage=3)
    _, one = _owl_stage2(gpus=1, zero_stage=3)
    largest_gathered = one.parts["weights (bf16)"] - 2 * 7_123_068_928
    assert eight.parts["weights (bf16)"] == pytest.approx(2 * 7_123_068_928 / 8 + largest_gathered)
    assert eight.parts["activations: llm"] == one.parts["activations: llm"] == 4 * 2048 * 32 * LLAMA_LAYER_BYTES
    assert "activations: vision" not in eight.parts  # frozen tower, nothing below it trains
    _, zero2 = _owl_stage2(gpus=8, zero_stage=2)
    assert zero2.parts["weights (bf16)"] == 2 * 7_123_068_928


def test_trainable_counts_drive_optimizer_states() -> None:
    config = preset_config("tiny")
    counts = {"vision": 100, "connector": 50, "llm": 1000, "total": 1150}
    shape = StageShape(gpus=4, zero_stage=3, micro_batch=1, seq_len=8)
    est = estimate(config, counts, {"vision": 100, "connector": 50, "llm": 0}, 10, {"vision": True, "llm": True},
                   shape)
    assert est.parts["fp32 master + Adam"] == 12 * 150 / 4
    assert est.parts["gradients"] == 2 * 150 / 4 + 4 * 150 / 4 + 2 * 150


def test_checkpointing_and_fused_cross_entropy_shrink_what_they_should() -> None:
    _, plain = _owl_stage2(gpus=8, micro_batch=4, seq_len=2048)
    _, ckpt = _owl_stage2(gpus=8, micro_batch=4, seq_len=2048, checkpointing={"llm": True}, fused_cross_entropy=True)
    tokens = 4 * 2048
    assert ckpt.parts["activations: llm"] == tokens * (2 * 4096 * 32 + LLAMA_LAYER_BYTES)
    assert plain.parts["logits + loss"] == 10 * tokens * 32000 and ckpt.parts["logits + loss"] == 0
    assert ckpt.total < plain.total - 25 * GIB


def test_summary_cli_prints_the_stage_table(capsys) -> None:
    assert cli_main(["model", "summary", "--preset", "owl-7b", "--gpus", "8", "--stage", "instruct"]) == 0
    out = capsys.readouterr().out
    assert "stage instruct of owl-7b.yaml on 8 GPU(s), ZeRO-3" in out
    assert "activations: llm" in out and "total" in out
