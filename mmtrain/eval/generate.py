"""Inference on a model directory: load it, generate answers in batches, score reference answers (teacher forced).

Used by `mmtrain eval`, `mmtrain generate` and `mmtrain chat`; everything here is plain single-process code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from mmtrain.data.loader.chat_template import ChatTemplate
from mmtrain.data.loader.images import ImageConfig, decode_image, normalize_batch, resize_image, to_uint8
from mmtrain.data.loader.templates import CHAT, Renderer, get_template
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.errors import UserError
from mmtrain.eval.prompts import Prompt, left_padded, render_prompt, right_padded_with_answers
from mmtrain.model import VisionLanguageModel
from mmtrain.model.llava_layout import is_llava_dir, load_llava_dir
from mmtrain.model.lora import load_adapter
from mmtrain.model.weights_io import WEIGHTS_NAME

GREY = 128
"""The `--blank-images` ablation's pixel value (all three channels): a constant mid-grey image."""


def image_config_for(model_dir: Path, vision_config: dict[str, Any]) -> ImageConfig:
    """The exported `image_processor.json` when present (the trainer's exact preprocessing), else the tower's size
    with CLIP defaults (stage directories do not carry one)."""
    path = model_dir / "image_processor.json"
    if not path.is_file():
        return ImageConfig(size=int(vision_config.get("image_size", 224)))
    raw = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(ImageConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
    return ImageConfig(**{**kwargs, "augment": False})  # evaluation never augments


def load_pixels(images: Sequence[bytes], cfg: ImageConfig, blank: bool = False) -> torch.Tensor:
    """Encoded images → normalized [N, 3, S, S]; with `blank` every image becomes the same constant grey (the
    ablation that shows whether answers depend on the pixels at all)."""
    if not images:
        return torch.zeros((0, *cfg.shape))
    if blank:
        return normalize_batch(torch.full((len(images), *cfg.shape), GREY, dtype=torch.uint8), cfg)
    return normalize_batch(torch.stack([to_uint8(resize_image(decode_image(b, draft_size=cfg.size), cfg))
                                        for b in images]), cfg)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    image_config: ImageConfig
    template: str
    device: torch.device

    def renderer(self) -> Renderer:
        return Renderer(self.tokenizer, self.template, self.model.num_image_slots)


def recorded_template(folder: Path) -> str:
    """The chat template the trainer recorded beside the weights (`mmtrain.json`), else mPLUG-Owl's."""
    info = folder / "mmtrain.json"
    if info.is_file():
        return str(json.loads(info.read_text(encoding="utf-8")).get("template") or "owl")
    return "owl"


def load_model(model_dir: str | Path, template: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """A VisionLanguageModel directory (`mmtrain export` output, a LLaVA one included, or a trainer `stages/<name>/`
    folder) with its tokenizer; an unmerged `adapter/` (export without `--merge`) is loaded on top of the base weights."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"{folder}: not a model directory (needs config.json and {WEIGHTS_NAME}; "
                        "use `mmtrain export` on a checkpoint)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"{folder}: no tokenizer files beside the model")
    template = template or recorded_template(folder)
    try:
        get_template(template)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model = load_llava_dir(folder) if is_llava_dir(folder) else VisionLanguageModel.from_pretrained(folder)
    if (folder / "adapter" / "adapter_config.json").is_file():
        load_adapter(model, folder / "adapter")
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(folder)
    return LoadedModel(model, tokenizer, image_config_for(folder, model.config.vision_config), template, device)


def stop_ids(tokenizer: Any, template: str) -> list[int]:
    """Where an answer ends: EOS, and for `template: chat` the special tokens that close an assistant turn in the
    tokenizer's chat template (an instruct model ends its turn with `<|im_end|>` / `<|eot_id|>`, not always EOS)."""
    ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    if template == CHAT:
        ids += [i for i in ChatTemplate(tokenizer).end_of_turn_ids() if i not in ids]
    return ids


class Generator:
    """Batched generation and reference-answer loss for one loaded model."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.render = loaded.renderer()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.stop_ids = stop_ids(self.tokenizer, loaded.template)

    def prompt(self, conversation: Sequence[dict], images: Sequence[bytes] = (), reference: str | None = None,
               key: str | None = None) -> Prompt:
        return render_prompt(self.render, conversation, images, reference, key)

    def _pixels(self, prompts: Sequence[Prompt], blank: bool) -> torch.Tensor:
        images = [img for p in prompts for img in p.images]
        dtype = next(self.model.parameters()).dtype
        return load_pixels(images, self.loaded.image_config, blank).to(self.loaded.device, dtype)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, batch_size: int = 16,
                 blank_images: bool = False) -> list[str]:
        """Answers in the order of `prompts`. Greedy when `temperature` is 0. Prompts are batched by length
        (left-padded), so padding stays small; greedy answers equal one-by-one generation (tested)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.loaded.device).manual_seed(seed)
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            chunk = [prompts[i] for i in rows]
            batch = left_padded(chunk, self.pad_id)
            dev = self.loaded.device
            tokens = self.model.generate(batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                                         pixel_values=self._pixels(chunk, blank_images),
                                         image_slots=batch.image_slots.to(dev), max_new_tokens=max_new_tokens,
                                         do_sample=temperature > 0, temperature=temperature or 1.0, top_k=top_k,
                                         top_p=top_p, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                         generator=generator)
            for i, row in zip(rows, tokens.tolist()):
                out[i] = self.decode(row)
        return out

    def decode(self, tokens: Sequence[int]) -> str:
        """New tokens → text, cut at the first stop token (EOS, or the chat template's end of turn)."""
        tokens = list(tokens)
        stop = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        if stop is not None:
            tokens = tokens[:stop]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    @torch.no_grad()
    def answer_nll(self, prompts: Sequence[Prompt], batch_size: int = 16,
                   blank_images: bool = False) -> list[tuple[float, int]]:
        """Per prompt: (summed negative log-likelihood of its reference answer + EOS, number of those tokens),
        teacher forced with labels only on the answer."""
        out: list[tuple[float, int]] = []
        dev = self.loaded.device
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first:first + batch_size]
            batch = right_padded_with_answers(chunk, self.pad_id)
            result = self.model(batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                                pixel_values=self._pixels(chunk, blank_images), image_slots=batch.image_slots.to(dev))
            labels = batch.labels[:, 1:].to(dev)
            picked = labels != -100
            logits = result.logits[:, :-1][picked].float()
            nll = torch.nn.functional.cross_entropy(logits, labels[picked], reduction="none")
            per_row = torch.zeros(len(chunk), device=dev).index_add_(0, picked.nonzero()[:, 0], nll)
            counts = picked.sum(1)
            out += [(float(s), int(c)) for s, c in zip(per_row.tolist(), counts.tolist())]
        return out


def mean_loss(pairs: Sequence[tuple[float, int]]) -> dict[str, float | None]:
    """Token-weighted mean loss over samples (total NLL / total answer tokens) and its perplexity."""
    tokens = sum(n for _, n in pairs)
    if not tokens:
        return {"loss": None, "perplexity": None}
    loss = sum(s for s, _ in pairs) / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
