"""Generation prompts with the training template: a conversation up to and including the assistant role marker.

Why render through `Renderer` with an extra assistant turn and cut, instead of formatting a string: the template
tokenizes piece by piece, so the prompt's ids are exactly the ids the model saw before every answer in training
(a string rendered and tokenized whole can merge "AI: " with the answer's first token differently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from mmtrain.data.loader.templates import IGNORE_INDEX, Renderer
from mmtrain.data.loader.image_token import IMAGE_TOKEN


@dataclass
class Prompt:
    """One request: prompt ids (ending with the assistant marker), where each image's slot run starts, the images
    (encoded bytes, in mark order) and, when a reference answer was given, its ids (answer + EOS) for the loss."""

    input_ids: list[int]
    image_starts: list[int]
    images: list[bytes] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def render_prompt(renderer: Renderer, conversation: Sequence[dict], images: Sequence[bytes] = (),
                  reference: str | None = None, key: str | None = None) -> Prompt:
    """`conversation` ends with a user turn (earlier assistant turns are history). Renders it plus an assistant turn
    holding `reference` (or nothing) and cuts where that turn's learned tokens start."""
    turns = list(conversation)
    if not turns or turns[-1]["role"] != "user":
        raise ValueError(f"{key or '?'}: a generation prompt must end with a user turn")
    marks = sum(t["content"].count(IMAGE_TOKEN) for t in turns if t["role"] == "user")
    if marks != len(images):
        raise ValueError(f"{key or '?'}: {marks} {IMAGE_TOKEN} marks but {len(images)} images")
    rendered = renderer.render(turns + [{"role": "assistant", "content": reference or ""}], key=key)
    labels = rendered.labels
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # the final turn's EOS
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    answer = rendered.input_ids[start:end + 1] if reference is not None else []
    return Prompt(rendered.input_ids[:start], [s for s in rendered.image_starts if s < start], list(images), answer)


def user_turn(prompt: str, num_images: int) -> dict[str, str]:
    """A user turn for a plain prompt: images first, one mark per line (as the catalog tasks put them), unless the
    prompt already places its own `<image>` marks."""
    if IMAGE_TOKEN in prompt or num_images == 0:
        return {"role": "user", "content": prompt}
    return {"role": "user", "content": "\n".join([IMAGE_TOKEN] * num_images + [prompt])}


@dataclass
class PromptBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_slots: torch.Tensor
    labels: torch.Tensor | None = None


def left_padded(prompts: Sequence[Prompt], pad_id: int) -> PromptBatch:
    """Prompts for generation: left-padded (new tokens are appended on the right), image slots shifted by the pad."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    slots = []
    for row, p in enumerate(prompts):
        pad = width - len(p)
        ids[row, pad:] = torch.tensor(p.input_ids, dtype=torch.long)
        mask[row, pad:] = 1
        slots += [(row, s + pad) for s in p.image_starts]
    return PromptBatch(ids, mask, torch.tensor(slots, dtype=torch.long).reshape(-1, 2))


def right_padded_with_answers(prompts: Sequence[Prompt], pad_id: int) -> PromptBatch:
    """Prompt + reference answer, right-padded, labels only on the answer (and its EOS): the teacher-forced pass."""
    rows = [p.input_ids + p.answer_ids for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    slots = []
    for row, (p, r) in enumerate(zip(prompts, rows)):
        ids[row, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[row, :len(r)] = 1
        labels[row, len(p):len(r)] = torch.tensor(p.answer_ids, dtype=torch.long)
        slots += [(row, s) for s in p.image_starts]
    return PromptBatch(ids, mask, torch.tensor(slots, dtype=torch.long).reshape(-1, 2), labels)
