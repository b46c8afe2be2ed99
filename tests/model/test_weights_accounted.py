"""Every checkpoint tensor accounted for: loading a pretrained LLM or vision tower, or starting weights into a
(partitioned) model, stops naming the tensors it could not place, rather than training with a silently dropped or
uninitialised weight."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from mmtrain.errors import UserError
from mmtrain.model import VisionLanguageModel, VLMConfig, tiny_config
from mmtrain.model.llm import load_llm
from mmtrain.model.vision import VisionTower
from mmtrain.train.zero import load_into


def edit_safetensors(folder, add: dict[str, torch.Tensor] = {}, drop: tuple[str, ...] = ()) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    for name in drop:
        del state[name]
    save_file({**state, **add}, str(path), metadata={"format": "pt"})


@pytest.fixture
def llama_dir(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_a_whole_llm_checkpoint_loads_with_every_tensor(llama_dir):
    model = load_llm(llama_dir)
    saved = load_file(str(llama_dir / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())


def test_an_llm_checkpoint_with_an_extra_and_a_missing_tensor_is_refused_naming_both(llama_dir):
    edit_safetensors(llama_dir, add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
                     drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(UserError) as caught:
        load_llm(llama_dir)
    assert str(caught.value) == (
        f"{llama_dir}: not every weight is accounted for: 1 LLM parameter(s) the checkpoint does not have: "
        "model.layers.1.mlp.up_proj.weight; 1 checkpoint tensor(s) with no place in the LLM: "
        "model.layers.0.self_attn.q_proj.bias")


@pytest.fixture
def clip_dir(tmp_path):
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 50}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_a_clip_checkpoint_gives_its_vision_tower_and_counts_what_it_left_out(clip_dir):
    saved = load_file(str(clip_dir / "model.safetensors"))
    other = [n for n in saved if not n.startswith("vision_model.")]
    with pytest.warns(UserWarning) as warned:
        tower = VisionTower.from_pretrained(clip_dir)
    assert str(warned[0].message) == (f"{clip_dir}: read its vision tower; left out the checkpoint's other parts "
                                      f"({len(other)} tensors under logit_scale, text_model, text_projection, "
                                      "visual_projection)")
    own = {n.removeprefix("vision_model."): p for n, p in tower.model.state_dict().items()}
    vision = {n.removeprefix("vision_model."): t for n, t in saved.items() if n.startswith("vision_model.")}
    assert vision.keys() <= own.keys() and all(torch.equal(own[n], t) for n, t in vision.items())


def test_an_extra_tensor_inside_the_vision_tower_is_refused(clip_dir):
    edit_safetensors(clip_dir, add={"vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match=r"1 checkpoint tensor\(s\) with no place in the vision tower: "
                                        r"(vision_model\.)?encoder\.layers\.0\.mlp\.fc3\.weight$"):
        VisionTower.from_pretrained(clip_dir)


@pytest.fixture
def tied_model():
    torch.manual_seed(0)
    raw = tiny_config("mlp", layers=1).to_dict()
    raw["text_config"]["tie_word_embeddings"] = True
    return VisionLanguageModel.from_config(VLMConfig.from_dict(raw))


def test_starting_weights_round_trip_exactly_tied_names_included(tied_model):
    state = {n: torch.randn_like(p) for n, p in tied_model.named_parameters()}
    state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"]  # a tied alias, as read_weights gives it
    fresh = VisionLanguageModel.from_config(tied_model.config)
    load_into(fresh, state, rank=0, zero3=False)
    assert all(torch.equal(p, state[n]) for n, p in fresh.named_parameters())
    assert fresh.llm.lm_head.weight is fresh.llm.model.embed_tokens.weight


@pytest.mark.parametrize("fault, message", [
    ("extra", "1 checkpoint tensor(s) with no place in the model: llm.model.layers.0.self_attn.q_proj.bias"),
    ("missing", "1 model parameter(s) the checkpoint does not have: llm.model.norm.weight"),
    ("shape", "1 tensor(s) whose shape differs from the model's: llm.model.norm.weight (3,) vs (64,)"),
    ("untied", "the model ties weights the checkpoint holds apart: llm.lm_head.weight (tied to "
               "llm.model.embed_tokens.weight)"),
])
def test_starting_weights_that_do_not_fit_are_refused_naming_the_tensor(tied_model, fault, message):
    state = {n: p.detach().clone() for n, p in tied_model.named_parameters()}
    if fault == "extra":
        state["llm.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    elif fault == "missing":
        del state["llm.model.norm.weight"]
    elif fault == "shape":
        state["llm.model.norm.weight"] = torch.zeros(3)
    else:
        state["llm.lm_head.weight"] = torch.zeros_like(state["llm.model.embed_tokens.weight"])
    with pytest.raises(UserError) as caught:
        load_into(VisionLanguageModel.from_config(tied_model.config), state, rank=0, zero3=False, source="DIR")
    assert str(caught.value).endswith(message)
    assert str(caught.value).startswith("DIR: ")
