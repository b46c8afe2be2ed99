"""Connector shapes, slot counts from configs alone, the registry, and the vision tower's options."""

from __future__ import annotations

import pytest
import torch

from mmtrain.model.config import VLMConfig, num_image_slots
from mmtrain.model.connectors import connector_class
from mmtrain.model.presets import tiny_config
from vlm_helpers import make_model

HIDDEN = 64  # tiny LLM and vision width


def test_registry_raises_on_unknown_name_listing_known():
    with pytest.raises(ValueError, match=r"unknown connector 'qformer'.*\['abstractor', 'layerwise', 'mlp', 'xattn'\]"):
        connector_class("qformer")
    with pytest.raises(ValueError, match="unknown connector 'qformer'"):
        VLMConfig(connector="qformer", vision_config={"model_type": "vit"}, text_config={"model_type": "llama"})


@pytest.mark.parametrize(
    "connector, expected",
    [("abstractor", (2, 65, HIDDEN)), ("mlp", (2, 17, HIDDEN)), ("xattn", (2, 8, HIDDEN)), ("layerwise", (2, 4, HIDDEN))],
)
def test_connector_output_shapes(connector, expected):
    model = make_model(connector)
    features = model.vision(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 17, HIDDEN)  # 4x4 patches of 8 px + CLS
    assert model.connector(features).shape == expected


def test_abstractor_yields_65_tokens_per_image_and_config_agrees():
    model = make_model("abstractor")
    out = model.connector(model.vision(torch.randn(3, 3, 32, 32)))
    assert out.shape[:2] == (3, 65)
    assert model.num_image_slots == num_image_slots(model.config) == 65
    # the 65th token is the learnable end-of-image vector, the same for every image
    torch.testing.assert_close(out[0, 64], out[2, 64], rtol=0, atol=0)
    assert not torch.allclose(out[0, :64], out[2, :64])


@pytest.mark.parametrize(
    "connector, overrides, slots",
    [("abstractor", {}, 65), ("mlp", {}, 17), ("mlp", {"vision_keep_cls": False}, 16),
     ("mlp", {"vision_family": "siglip_vision_model"}, 16), ("mlp", {"vision_family": "vit", "vision_keep_cls": False}, 16),
     ("xattn", {}, 1), ("layerwise", {}, 0)],
)
def test_num_image_slots_from_config_alone_matches_model(connector, overrides, slots):
    config = tiny_config(connector, **overrides)
    assert num_image_slots(config) == config.num_image_slots() == slots
    model = make_model(connector, **overrides)
    assert model.num_image_slots == slots
    if connector == "mlp":
        assert model.connector(model.vision(torch.randn(1, 3, 32, 32))).shape[1] == slots


def test_vision_select_layer_takes_the_named_hidden_state():
    last = make_model("mlp", vision_select_layer=-1)
    penultimate = make_model("mlp", vision_select_layer=-2, vision_keep_cls=False)
    pixels = torch.randn(1, 3, 32, 32)
    hidden = last.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(last.vision(pixels), hidden[-1], rtol=0, atol=0)
    torch.testing.assert_close(penultimate.vision(pixels), hidden[-2][:, 1:], rtol=0, atol=0)
