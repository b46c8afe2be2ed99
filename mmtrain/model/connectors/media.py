"""Per-sample media for conditioning connectors, and Flamingo-style media-position masking.

Images arrive flat (`[N_img, L, D]` with `image_slots[i] = (sample, position)`); conditioning connectors need them per
sample (`[B, M, L, D]`, ordered by position) and need to know, for every text token, which images it may see: the
images whose position is at or before the token's position (all of them, or only the latest one as in Flamingo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_MEDIA = 2**40  # position of an absent (padding or dummy) image: no token ever sees it


@dataclass
class MediaState:
    """What the decoder-layer hooks read during one LLM call."""

    tokens: torch.Tensor
    """[B, M, L, D] media tokens per sample, ordered by position; padded with anything (never visible)."""
    positions: torch.Tensor
    """[B, M] long: row position of each image's `<image>` mark; NO_MEDIA where absent."""
    token_positions: torch.Tensor | None = None
    """[B, T] long: row positions of the tokens of the current call (arange, or past length + arange when cached)."""
    segment_starts: torch.Tensor | None = None
    """[B, T] long: row position where each token's sample starts (packed rows hold several); None: 0."""

    def visibility(self, immediate_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(key mask [B, T, M*L] bool, has_media [B, T, 1] float) for the current call's tokens."""
        if self.token_positions is None:
            raise RuntimeError("MediaState.token_positions is unset: the VLM sets it before each LLM call")
        batch, num_media, length, _ = self.tokens.shape
        visible = self.positions[:, None, :] <= self.token_positions[:, :, None]  # [B, T, M]
        if immediate_only:  # images are sorted by position: the latest one before a token is the last visible
            index = torch.arange(num_media, device=visible.device)
            visible = visible & (index[None, None, :] == (visible.sum(-1) - 1)[:, :, None])
        if self.segment_starts is not None:  # packing: never an image of an earlier sample in the same row
            visible &= self.positions[:, None, :] >= self.segment_starts[:, :, None]
        mask = visible[..., None].expand(*visible.shape, length).reshape(batch, -1, num_media * length)
        has_media = visible.any(-1).to(self.tokens.dtype)[..., None]
        return mask, has_media


def build_media(tokens: torch.Tensor, image_slots: torch.Tensor | None, batch_size: int) -> MediaState:
    """Group flat per-image tokens by sample. `image_slots=None` means a dummy image nobody sees."""
    num_images, length, dim = tokens.shape
    if image_slots is None:
        positions = torch.full((batch_size, 1), NO_MEDIA, dtype=torch.long, device=tokens.device)
        return MediaState(tokens[:1, None].expand(batch_size, 1, length, dim), positions)
    if image_slots.shape != (num_images, 2):
        raise ValueError(f"image_slots has shape {tuple(image_slots.shape)}, expected ({num_images}, 2) for {num_images} images")
    sample, position = image_slots[:, 0].long(), image_slots[:, 1].long()
    if num_images and (sample.min() < 0 or sample.max() >= batch_size):
        raise ValueError(f"image_slots names samples {sample.tolist()} but the batch has {batch_size}")
    order = torch.argsort(sample * (NO_MEDIA + 1) + position)
    sample, position = sample[order], position[order]
    counts = torch.bincount(sample, minlength=batch_size)
    num_media = max(int(counts.max()), 1) if num_images else 1
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_images, device=tokens.device) - first[sample]
    padded = tokens.new_zeros(batch_size, num_media, length, dim)
    padded = padded.index_put((sample, rank), tokens[order])
    positions = torch.full((batch_size, num_media), NO_MEDIA, dtype=torch.long, device=tokens.device)
    positions[sample, rank] = position
    return MediaState(padded, positions)


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, has_media: torch.Tensor
) -> torch.Tensor:
    """Attention of [B, H, T, d] queries over [B, H, S, d] keys with a [B, T, S] mask, zero where nothing is visible.

    Masked scores get the dtype's lowest finite value (never -inf), so rows with no visible key stay finite and are
    then multiplied by zero: a zero gate times this output is exactly zero.
    """
    scale = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(weights, value)  # [B, H, T, d]
    return out * has_media[:, None]
