"""Tiny models and batches shared by the model tests (CPU, built from configs, nothing downloaded)."""

from __future__ import annotations

import torch

from mmtrain.model.presets import tiny_config
from mmtrain.model.vlm import VisionLanguageModel


def make_model(connector: str = "abstractor", seed: int = 0, **kwargs) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.from_config(tiny_config(connector, **kwargs)).eval()


def make_batch(model: VisionLanguageModel, images_per_sample=(1, 0), text_len: int = 6, seed: int = 1):
    """Right-aligned text around image slot runs: sample b gets images_per_sample[b] images, each after 2 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    slots_per_image = model.num_image_slots
    vocab = model.config.text_config["vocab_size"] - 2
    rows, image_slots = [], []
    for b, n in enumerate(images_per_sample):
        row: list[int] = []
        for _ in range(n):
            row += torch.randint(1, vocab, (2,), generator=gen).tolist()
            image_slots.append((b, len(row)))
            row += [model.config.image_token_id] * slots_per_image
        row += torch.randint(1, vocab, (text_len,), generator=gen).tolist()
        rows.append(row)
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == model.config.image_token_id), -100)
    size = model.vision.image_size
    pixel_values = torch.randn(len(image_slots), 3, size, size, generator=gen)
    slots = torch.tensor(image_slots, dtype=torch.long).reshape(-1, 2)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values, "image_slots": slots}


def build_bare(model: VisionLanguageModel):
    """An independent copy of the model's LLM with no connector hooks: the reference the gates must reproduce."""
    from mmtrain.model.llm import build_llm

    llm = build_llm(model.config.text_config)
    llm.load_state_dict(model.llm.state_dict())
    return llm.eval()


def set_gates(model: VisionLanguageModel, value: float, suffix: str = "gate") -> None:
    """Open (or close) the connector's tanh gates: all of them, or those whose name ends with `suffix`."""
    with torch.no_grad():
        for name, p in model.connector.named_parameters():
            if name.endswith(suffix):
                p.fill_(value)


def adamw_losses(model: VisionLanguageModel, batch: dict, steps: int, lr: float = 1e-3) -> list[float]:
    """The loss of each of `steps` AdamW steps on the same batch (for tests that pin training, not one forward)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
