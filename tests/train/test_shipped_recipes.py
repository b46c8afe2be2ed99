"""The shipped paper recipes start from stock-layout checkpoints with no edit beyond their paths: tiny stand-ins in
the layouts users download (a full CLIPModel directory with its image processor, a LLaMA directory whose vocabulary
lacks the tokens our templates add) take the place of the 7B ones, and every stage of each recipe builds, loads the
checkpoints' weights and takes an optimizer step in one process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM

from mmtrain.config import load_recipe
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.model import VisionLanguageModel, apply_stage_policy
from mmtrain.train.stage_model import image_config, initial_state, model_config
from mmtrain.train.stage_setup import loader_config
from train_helpers import REPO

RECIPES = ("owl-7b", "mmgpt-9b", "pum-7b")
STOCK_VOCAB = 380
"""The stand-in LLaMA's vocabulary: smaller than the test tokenizer's, as a stock LLaMA's 32,000 is smaller than
its tokenizer once `<image>` and `<pad>` are added."""


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stock")
    torch.manual_seed(0)
    clip = CLIPConfig(vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                      text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "vocab_size": 64}, projection_dim=16)
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    llama = LlamaConfig(vocab_size=STOCK_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    LlamaForCausalLM(llama).save_pretrained(root / "llama")
    return {"clip": root / "clip", "llama": root / "llama"}


def paths_only(name: str, data: dict[str, Path], stock: dict[str, Path]) -> list[str]:
    """`--set` overrides of a shipped recipe's paths, and of nothing else."""
    raw = load_recipe(REPO / "launch" / "recipes" / f"{name}.yaml")
    sets = [f"tokenizer={data['tokenizer']}", f"model.vision_path={stock['clip']}",
            f"model.llm_path={stock['llama']}"]
    for s, stage in enumerate(raw.stages):
        for d, source in enumerate(stage.data):
            kind = "text" if any(word in source.shards for word in ("text", "language-only")) else "mm"
            sets.append(f"stages.{s}.data.{d}.shards={data[kind]}")
        sets.append(f"stages.{s}.deepspeed={REPO / stage.deepspeed}")
    return sets


@pytest.mark.parametrize("name", RECIPES)
def test_a_shipped_recipe_trains_every_stage_from_stock_checkpoints(name, tiny_data, stock) -> None:
    recipe = load_recipe(REPO / "launch" / "recipes" / f"{name}.yaml", paths_only(name, tiny_data, stock))
    tokenizer = load_tokenizer(recipe.tokenizer)
    config = model_config(recipe, tokenizer)
    assert config.text_config["vocab_size"] == -(-len(tokenizer) // 64) * 64 > STOCK_VOCAB
    assert (config.vision_config["hidden_size"], config.llm_hidden_size) == (32, 64)
    state = initial_state(recipe, config)
    llama = load_file(str(stock["llama"] / "model.safetensors"))
    assert torch.equal(state["llm.model.layers.0.self_attn.q_proj.weight"], llama["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(state["llm.model.embed_tokens.weight"][:STOCK_VOCAB], llama["model.embed_tokens.weight"])
    images = image_config(recipe, config)
    for stage in recipe.stages:
        model = VisionLanguageModel.from_config(config)
        model.load_state_dict(state, strict=True)
        apply_stage_policy(model, vision=stage.train.vision, connector=stage.train.connector, llm=stage.train.llm,
                           lora_roles=stage.lora.roles, r=stage.lora.r, alpha=stage.lora.alpha)
        cfg = dataclasses.replace(loader_config(recipe, stage, config, images), num_workers=0, batch_size=2,
                                  max_length=min(stage.max_length, 256), pack=False)
        batch = next(iter(build_loader(cfg, tokenizer, 0, 1)))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                                          "image_slots")}).loss.backward()
        optimizer.step()
        moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
        assert moved, f"{name} stage {stage.name}: no trainable weight moved"
