"""Tokenizer: train a small sentencepiece model on shard text and save it as a HF tokenizer directory.

Any HF tokenizer directory works with the loader; this module exists so tests and the demo have a real tokenizer
without a download. The sentencepiece model is trained with identity normalization, no dummy prefix and byte
fallback, so encoding a conversation piece by piece (as the template does) gives the same text back on decode.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer

from mmtrain.data.loader.image_token import IMAGE_TOKEN
from mmtrain.data.loader.templates import TEMPLATES

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def load_tokenizer(path: str | os.PathLike):
    """Load any HF tokenizer directory and make sure it has the image placeholder and a pad token. Remote code is
    never run (an exported model directory names its modeling code in config.json; the tokenizer needs none, and
    transformers would otherwise stop to ask)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    ensure_special_tokens(tok)
    return tok


def ensure_special_tokens(tok) -> None:
    """Add `<image>` (and a pad token, falling back to EOS' text) when a foreign tokenizer lacks them."""
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token_id is None:
        tok.add_special_tokens({"pad_token": "<pad>"})


def iter_shard_texts(shards_dir: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Yield every turn's text (image marks removed) from a shard set, in manifest order."""
    root = Path(shards_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(root / shard["name"]) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".json"):
                    record = json.loads(tf.extractfile(member).read())
                    for turn in record["conversation"]:
                        text = turn["content"].replace(IMAGE_TOKEN, " ").strip()
                        if text:
                            yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Path:
    """Train a BPE sentencepiece model on `texts` and save it as a HF tokenizer directory at `out_dir`.

    The template's fixed strings (system lines, role markers) are added to the training text about as often as they
    occur in rendered samples, so they tokenize compactly (the owl system line: 30 pieces at 1,000, not 86). BPE
    training is deterministic: the same text gives the same model. Returns `out_dir`.
    """
    lines = [t for t in texts if t.strip()]
    if not lines:
        raise ValueError("no text to train a tokenizer on")
    # Every rendered sample starts with a system line and has role markers: weighted like that (about one copy per
    # conversation, shared between the templates) they become a few pieces each instead of ~3 characters a token.
    copies = max(1, len(lines) // (2 * len(TEMPLATES)))
    for template in TEMPLATES.values():
        lines.extend(template.fixed_strings() * copies)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        # byte pieces (256) + specials take ids first; the BPE merges need some room on top of them.
        min_vocab = 256 + 5 + 16
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=max(vocab_size, min_vocab),
            model_type="bpe", byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=[IMAGE_TOKEN],
            hard_vocab_limit=False, num_threads=1, minloglevel=2,
        )
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        shutil.copy(prefix + ".model", os.path.join(model_dir, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(model_dir, add_prefix_space=False, legacy=False, **SPECIAL_TOKENS)
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tok.save_pretrained(str(out))
        # the sentencepiece model itself, for reference (loading uses tokenizer.json)
        shutil.copy(prefix + ".model", out / "sentencepiece.model")
    return out
