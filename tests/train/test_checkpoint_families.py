"""Stock-layout checkpoints in: a recipe names a connector and two local HF directories (no preset), the model is
described by their own config.json files, the images by the tower's preprocessor_config.json. Two stages on 2 ranks
from each family's checkpoints: tests/train/test_families.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from mmtrain.config import load_recipe
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.errors import UserError
from mmtrain.train.stage_model import image_config, model_config
from train_helpers import stage, write_recipe


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    SiglipVisionModel(vision).save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")  # mean = std = 0.5
    llm = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    Qwen2ForCausalLM(llm).save_pretrained(root / "qwen2")
    return {"vision": root / "siglip", "llm": root / "qwen2"}


def recipe_for(tmp_path: Path, tiny_data, checkpoints, **model) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_data, [
        stage("align", tiny_data, train={"vision": True, "connector": True, "llm": "frozen"}, steps=3,
              optimizer={"lr": 1e-3}),
        stage("lora", tiny_data, train={"vision": False, "connector": False, "llm": "lora"},
              lora={"roles": ["self_attn", "ffn"], "r": 4, "alpha": 8}, steps=2, optimizer={"lr": 1e-3}),
    ], model={"connector": "mlp", "vision_path": str(checkpoints["vision"]), "llm_path": str(checkpoints["llm"]),
              **model})


def test_the_model_is_what_the_checkpoints_describe(tmp_path, tiny_data, checkpoints) -> None:
    recipe = load_recipe(recipe_for(tmp_path, tiny_data, checkpoints))
    config = model_config(recipe, load_tokenizer(recipe.tokenizer))
    assert (config.connector, config.vision_config["model_type"], config.text_config["model_type"]) == \
        ("mlp", "siglip_vision_model", "qwen2")
    assert (config.text_config["hidden_size"], config.text_config["vocab_size"], config.vision_config["patch_size"]) \
        == (64, 512, 8)
    assert config.num_image_slots() == 16  # (32 / 8)² patches, SigLIP has no CLS
    images = image_config(recipe, config)
    assert (images.size, images.mean, images.std) == (32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_without_a_preset_the_connector_must_be_named(tmp_path, tiny_data, checkpoints) -> None:
    recipe = load_recipe(recipe_for(tmp_path, tiny_data, checkpoints, connector=None))
    with pytest.raises(UserError, match="^model: name a preset, or a connector with vision_path and llm_path"):
        model_config(recipe, load_tokenizer(recipe.tokenizer))


def test_tokens_the_tokenizer_adds_grow_a_pretrained_vocabulary_at_the_mean(tmp_path, tiny_data, checkpoints) -> None:
    """A stock LLM whose tokenizer gained tokens (<image>, <pad>): the config's vocabulary is the tokenizer's (rounded
    up to 64), the checkpoint's rows are kept and every new row of the embeddings and the untied head is their
    mean."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmtrain.model import VisionLanguageModel

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    recipe = load_recipe(recipe_for(tmp_path, tiny_data, {**checkpoints, "llm": tmp_path / "llama"}))
    tokenizer = load_tokenizer(recipe.tokenizer)
    config = model_config(recipe, tokenizer)
    assert len(tokenizer) > 128 and config.text_config["vocab_size"] == -(-len(tokenizer) // 64) * 64
    model = VisionLanguageModel.from_config(config, pretrained=True)
    saved = load_file(str(tmp_path / "llama" / "model.safetensors"))
    for table, name in ((model.llm.get_input_embeddings(), "model.embed_tokens.weight"),
                        (model.llm.get_output_embeddings(), "lm_head.weight")):
        assert table.weight.shape[0] == config.text_config["vocab_size"]
        assert torch.equal(table.weight[:128], saved[name])
        assert torch.equal(table.weight[128:], saved[name].mean(dim=0).expand(table.weight.shape[0] - 128, -1))
