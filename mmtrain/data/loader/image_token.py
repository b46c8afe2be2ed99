"""The image placeholder token: its text, and its id in a tokenizer (shared by templates and tokenizers)."""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
"""The image placeholder: marks an image in conversation text and fills every image slot in `input_ids`."""


def image_token_id(tok) -> int:
    """Id of the image placeholder token; raises if the tokenizer does not have it."""
    idx = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if idx is None or idx == tok.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; load it with mmtrain.data.loader.tokenizer.load_tokenizer")
    return int(idx)
