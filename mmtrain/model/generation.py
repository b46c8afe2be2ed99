"""Generation with images: greedy or sampling, with or without the LLM's KV cache.

The prompt (with its images) runs once; with the cache each later step feeds only the new token, and conditioning
connectors keep the prompt's media (`reuse_media`). Without the cache every step re-runs the whole sequence, images
included, which is the reference the cached path must match.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
             image_slots: torch.Tensor | None = None, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns [B, max_new_tokens] new tokens (pad after eos). Batched prompts must be left-padded. `eos_token_id`
    may list several stop tokens (EOS and a chat template's end of turn)."""
    was_training = model.training
    model.eval()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask = input_ids, attention_mask.long()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    stops = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=ids.device)
    out, past = [], None
    try:
        for step in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            if use_cache and step > 0:
                result = model(ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], past_key_values=past,
                               use_cache=True, reuse_media=True)
            else:
                result = model(ids, attention_mask=mask, pixel_values=pixel_values, image_slots=image_slots,
                               position_ids=positions, use_cache=use_cache)
            past = result.past_key_values if use_cache else None
            token = _next_token(result.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            out.append(token)
            was_finished = finished.clone()
            if stops is not None:
                finished = finished | torch.isin(token, stops)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, (~was_finished).long()[:, None]], dim=1)
            if bool(finished.all()):
                break
    finally:
        model.connector.condition(None)
        model.train(was_training)
    return torch.stack(out, dim=1)
