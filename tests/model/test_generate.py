"""Generation with images: the KV-cached path must produce what re-running the whole sequence produces."""

from __future__ import annotations

import pytest
import torch

from vlm_helpers import make_batch, make_model, set_gates


def _left_padded_prompt(model):
    """Two prompts of different lengths, left-padded (image slots shifted with them)."""
    batch = make_batch(model, images_per_sample=(1, 2), text_len=3)
    ids, mask, slots = batch["input_ids"], batch["attention_mask"], batch["image_slots"].clone()
    lengths = mask.sum(1)
    width = ids.shape[1]
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        pad = width - int(lengths[b])
        left_ids[b, pad:], left_mask[b, pad:] = ids[b, : lengths[b]], 1
        slots[slots[:, 0] == b, 1] += pad
    return left_ids, left_mask, batch["pixel_values"], slots


@pytest.mark.parametrize("connector", ["abstractor", "mlp", "xattn", "layerwise"])
def test_greedy_tokens_are_the_same_with_and_without_kv_cache(connector):
    model = make_model(connector)
    set_gates(model, 1.0)  # images must matter for the comparison to mean something
    ids, mask, pixels, slots = _left_padded_prompt(model)
    kwargs = dict(attention_mask=mask, pixel_values=pixels, image_slots=slots, max_new_tokens=8)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 8)
    assert torch.equal(cached, uncached)
    other_images = model.generate(ids, use_cache=True, **dict(kwargs, pixel_values=torch.randn_like(pixels) * 3))
    assert not torch.equal(other_images, cached)


def test_generation_stops_and_pads_after_eos():
    model = make_model("mlp")
    ids, mask, pixels, slots = _left_padded_prompt(model)
    first = model.generate(ids, attention_mask=mask, pixel_values=pixels, image_slots=slots, max_new_tokens=4)
    eos = int(first[0, 1])
    out = model.generate(ids, attention_mask=mask, pixel_values=pixels, image_slots=slots, max_new_tokens=4,
                         eos_token_id=eos, pad_token_id=0)
    assert out[0, 1] == eos and bool((out[0, 2:] == 0).all())
    # several stop tokens (EOS and a chat template's end of turn): the first one met stops the row
    never = int(model.config.text_config["vocab_size"]) - 2
    listed = model.generate(ids, attention_mask=mask, pixel_values=pixels, image_slots=slots, max_new_tokens=4,
                            eos_token_id=[never, eos], pad_token_id=0)
    assert torch.equal(listed, out)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make_model("abstractor")
    ids, mask, pixels, slots = _left_padded_prompt(model)
    kwargs = dict(attention_mask=mask, pixel_values=pixels, image_slots=slots, max_new_tokens=6, do_sample=True)
    a = model.generate(ids, generator=torch.Generator().manual_seed(5), temperature=2.0, **kwargs)
    b = model.generate(ids, generator=torch.Generator().manual_seed(5), temperature=2.0, **kwargs)
    assert torch.equal(a, b)
    greedy = model.generate(ids, attention_mask=mask, pixel_values=pixels, image_slots=slots, max_new_tokens=6)
    top1 = model.generate(ids, generator=torch.Generator().manual_seed(6), top_k=1, **kwargs)
    assert torch.equal(top1, greedy)
    hot = model.generate(ids, generator=torch.Generator().manual_seed(7), temperature=50.0, **kwargs)
    assert not torch.equal(hot, greedy)  # 256-token vocabulary at high temperature: 12 matches would be ~1e-28
