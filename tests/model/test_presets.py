"""Presets: paper-scale counts from configs alone (meta device), the summary command, the tiny preset."""

from __future__ import annotations

import math

import pytest
import torch

from mmtrain.cli import main
from mmtrain.errors import UserError
from mmtrain.model.presets import build_preset, preset_config, summarize

VIT_L14 = 304e6  # CLIP ViT-L/14 image tower, published
LLAMA_7B = 6.74e9  # LLaMA-7B, published (6,738,415,616)


def test_owl_7b_counts_match_published_part_sizes():
    s = summarize("owl-7b")
    assert abs(s.counts["vision"] / VIT_L14 - 1) < 0.01
    assert abs(s.counts["llm"] / LLAMA_7B - 1) < 0.01
    assert s.counts["llm"] == 6_738_415_616
    assert s.largest_layer == 32000 * 4096  # the embedding (or lm_head) is the largest single gather
    assert s.config.num_image_slots() == 65


@pytest.mark.parametrize("name, slots", [("owl-7b", 65), ("mmgpt-9b", 1), ("pum-7b", 0), ("llava-7b", 256)])
def test_paper_presets_name_their_connector_and_slots(name, slots):
    assert preset_config(name).num_image_slots() == slots


def test_zero3_estimate_follows_deepspeed_formula():
    s = summarize("llava-7b")
    total = s.counts["total"]
    assert s.zero3_bytes_per_gpu(8) == pytest.approx(4 * s.largest_layer + 18 * total / 8)
    frozen_llm = s.zero3_bytes_per_gpu(8, trainable=s.counts["connector"])
    assert frozen_llm == pytest.approx(4 * s.largest_layer + (18 * s.counts["connector"] + 2 * (total - s.counts["connector"])) / 8)


def test_summary_command_prints_counts_without_downloading(capsys):
    assert main(["model", "summary", "--preset", "owl-7b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "303,179,776" in out and "6,738,415,616" in out and "on 8 GPU(s)" in out


def test_summary_command_rejects_unknown_preset_in_one_line(capsys):
    assert main(["model", "summary", "--preset", "owl-70b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model preset 'owl-70b'" in err and "owl-7b" in err


def test_paper_preset_needs_local_paths(tmp_path):
    with pytest.raises(UserError, match="unset: vision_path, llm_path"):
        build_preset("owl-7b")
    with pytest.raises(UserError) as caught:
        build_preset("owl-7b", vision_path=str(tmp_path / "nope"), llm_path=str(tmp_path))
    assert str(caught.value) == (f"model.vision_path {tmp_path / 'nope'}: no config.json (a local HF checkpoint "
                                 "directory is expected)")


def test_tiny_preset_is_a_few_million_parameters_and_runs():
    s = summarize("tiny")
    assert 2e6 < s.counts["total"] < 20e6
    torch.manual_seed(0)
    model = build_preset("tiny")
    assert model.vision.image_size == 64 and model.num_image_slots == 65
    ids = torch.full((1, 70), 5)
    ids[0, 2:67] = model.config.image_token_id
    out = model(ids, labels=ids.masked_fill(ids == model.config.image_token_id, -100), pixel_values=torch.randn(1, 3, 64, 64),
                image_slots=torch.tensor([[0, 2]]))
    assert out.logits.shape == (1, 70, 32064)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)  # the loss is over the text tokens only
    assert abs(out.loss.item() - math.log(32064)) < 0.5  # untrained: near uniform over the 32,064 tokens
