"""Packed rows: a conditioning connector (xattn, layer-wise) never lets a sample see an earlier sample's image."""

from __future__ import annotations

import pytest
import torch

from mmtrain.model.attention import dense_document_mask

from vlm_helpers import make_batch, make_model, set_gates


@pytest.mark.parametrize("connector", ["xattn", "layerwise"])
def test_packed_row_equals_each_sample_alone_with_open_gates(connector: str) -> None:
    model = make_model(connector)
    set_gates(model, 0.7)  # gates open: images really change the text's hidden states
    first = make_batch(model, images_per_sample=(1,), text_len=5, seed=3)   # sample A: one image
    second = make_batch(model, images_per_sample=(0,), text_len=7, seed=4)  # sample B: text only, packed after A
    len_a, len_b = first["input_ids"].shape[1], second["input_ids"].shape[1]
    packed_ids = torch.cat([first["input_ids"], second["input_ids"]], dim=1)
    position_ids = torch.cat([torch.arange(len_a), torch.arange(len_b)])[None]
    segments = torch.tensor([[1] * len_a + [2] * len_b])
    with torch.no_grad():
        alone_a = model(input_ids=first["input_ids"], pixel_values=first["pixel_values"],
                        image_slots=first["image_slots"]).logits
        alone_b = model(input_ids=second["input_ids"]).logits
        packed = model(input_ids=packed_ids, attention_mask=dense_document_mask(segments), position_ids=position_ids,
                       pixel_values=first["pixel_values"], image_slots=first["image_slots"]).logits
    torch.testing.assert_close(packed[:, :len_a], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, len_a:], alone_b, atol=1e-5, rtol=1e-5)
