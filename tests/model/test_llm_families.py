"""Family quirks the connectors meet: tiny configs of every family, Phi-3's fused qkv_proj under the layer-wise
adapters, and Gemma's √hidden embedding scale beside spliced image tokens (transformers 5 moved it)."""

from __future__ import annotations

import pytest
import torch

from mmtrain.model.llm import decoder_layers
from mmtrain.model.presets import tiny_config
from mmtrain.model.vlm import VisionLanguageModel
from vlm_helpers import make_batch, make_model


def open_gates(model: VisionLanguageModel, value: float = 0.5) -> None:
    with torch.no_grad():
        for adapter in model.connector.adapters:
            adapter.gate.fill_(value)


@pytest.mark.parametrize("family", ["phi3", "qwen3"])
def test_tiny_config_gives_every_family_its_width(family):
    """Phi-3's default token ids (32000) and Qwen3's default 8 KV heads / head_dim 128 do not fit a tiny model."""
    model = make_model("layerwise", llm_family=family, layers=2)
    attn = decoder_layers(model.llm)[0].self_attn
    assert (attn.head_dim, model.llm.config.num_key_value_heads) == (16, 2)
    open_gates(model)
    batch = make_batch(model, images_per_sample=(1, 2))
    out = model(**batch)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.adapters.parameters())


def _unfused(phi3_state: dict[str, torch.Tensor], heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Phi-3 weights in LLaMA's layout: qkv_proj = [q; k; v] rows, gate_up_proj = [gate; up] rows."""
    state = {}
    for name, tensor in phi3_state.items():
        stem = name.rpartition(".")[0]
        if name.endswith("qkv_proj.weight"):
            q, k, v = tensor.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            state.update({stem.replace("qkv_proj", p) + ".weight": w
                          for p, w in (("q_proj", q), ("k_proj", k), ("v_proj", v))})
        elif name.endswith("gate_up_proj.weight"):
            gate, up = tensor.chunk(2)
            state.update({stem.replace("gate_up_proj", "gate_proj") + ".weight": gate,
                          stem.replace("gate_up_proj", "up_proj") + ".weight": up})
        else:
            state[name] = tensor
    return state


@torch.no_grad()
def test_layerwise_reads_phi3s_fused_qkv_as_llama_reads_separate_projections():
    """Phi-3 is LLaMA with fused projections: the same weights give the same logits, the layer-wise prefix (its
    queries, keys and values cut from qkv_proj) included."""
    phi3 = make_model("layerwise", llm_family="phi3", layers=2)
    open_gates(phi3)
    config = tiny_config("layerwise", layers=2)  # the same sizes, LLaMA's layout and Phi-3's norm epsilon
    config.text_config["rms_norm_eps"] = phi3.llm.config.rms_norm_eps
    llama = VisionLanguageModel.from_config(config).eval()
    llama.load_state_dict(_unfused(phi3.state_dict(), 4, 2, 16), strict=True)
    batch = make_batch(phi3, images_per_sample=(1, 2))
    expected = llama(**batch).logits
    assert (phi3(**batch).logits - expected).abs().max() < 1e-5
    open_gates(phi3, 0.0)  # and the prefix did contribute
    assert (phi3(**batch).logits - expected).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("family, scale", [("gemma", 8.0), ("llama", 1.0)])
def test_spliced_tokens_reach_the_first_layer_as_the_connector_made_them(family, scale):
    """The text embeddings enter Gemma's first layer times √hidden (8 here), the connector's tokens as they are,
    whether transformers scales inside the embedding module (5.x) or the model's forward (4.x)."""
    model = make_model("mlp", llm_family=family, layers=1)
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    decoder_layers(model.llm)[0].register_forward_pre_hook(grab, with_kwargs=True)
    batch = make_batch(model, images_per_sample=(1, 0))
    model(**batch)
    start, slots = int(batch["image_slots"][0, 1]), model.num_image_slots
    tokens = model.connector(model.vision(batch["pixel_values"]))[0]
    assert torch.equal(seen["hidden"][0, start:start + slots], tokens)
    text = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    text[0, start:start + slots] = False
    table = model.llm.get_input_embeddings().weight
    assert torch.equal(seen["hidden"][text], table[batch["input_ids"][text]] * scale)
