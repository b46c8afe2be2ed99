"""The vision path carries information: with the LLM frozen, vision + connector learn to name a patch's colour."""

from __future__ import annotations

import pytest
import torch

from mmtrain.model import VisionLanguageModel, apply_stage_policy
from mmtrain.model.presets import tiny_config

COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
ANSWER_IDS = torch.tensor([10, 11, 12])


def _batch(model: VisionLanguageModel, n: int, gen: torch.Generator):
    """[image slots][question token] → colour token; layer-wise models get a text token before the (0-slot) image."""
    slots = model.num_image_slots
    colour = torch.randint(0, 3, (n,), generator=gen)
    pixels = COLOURS[colour][:, :, None, None].expand(n, 3, 32, 32) + 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    prefix = torch.full((n, slots), model.config.image_token_id) if slots else torch.full((n, 1), 7)
    ids = torch.cat([prefix, torch.full((n, 1), 5), ANSWER_IDS[colour][:, None]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    image_slots = torch.stack([torch.arange(n), torch.full((n,), 0 if slots else 1)], dim=1)
    return ids, labels, pixels, image_slots, colour


@pytest.mark.parametrize("connector", ["abstractor", "mlp", "xattn", "layerwise"])
def test_frozen_llm_learns_colour_from_pixels(connector: str) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_config(connector, image_size=32, patch_size=8, hidden=64, layers=2,
                                                        vocab_size=64, image_token_id=63))
    if connector in ("xattn", "layerwise"):  # their tanh gates start at 0: the image is invisible until they open
        with torch.no_grad():
            for name, p in model.connector.named_parameters():
                if name.endswith("gate"):
                    p.fill_(0.5)
    apply_stage_policy(model, vision=True, connector=True, llm="frozen")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        ids, labels, pixels, image_slots, _ = _batch(model, 16, gen)
        loss = model(input_ids=ids, labels=labels, pixel_values=pixels, image_slots=image_slots).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ids, _, pixels, image_slots, colour = _batch(model, 300, gen)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, image_slots=image_slots).logits[:, -2, ANSWER_IDS]
        grey = model(input_ids=ids, pixel_values=torch.zeros_like(pixels), image_slots=image_slots).logits
    accuracy = (logits.argmax(-1) == colour).float().mean().item()
    assert accuracy >= 0.95, accuracy                        # chance is 1/3: the image decides the answer
    assert grey[:, -2, ANSWER_IDS].argmax(-1).unique().numel() == 1  # one grey image → one answer for all
