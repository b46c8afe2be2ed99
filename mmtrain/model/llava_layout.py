"""transformers' LLaVA (`LlavaForConditionalGeneration`) and mmtrain's `mlp` model are the same network: a CLIP or
SigLIP tower, a Linear-GELU-Linear projector over every patch feature, a causal LM whose image placeholders the
projected features replace. This module maps one onto the other: a LLaVA directory read as a starting model
(`config_from_llava`, `state_from_llava`) and a trained mlp model written as a LLaVA directory (`write_llava_dir`).

Weight names (ours ↔ LLaVA's). LLaVA's first spelling is the one written (the hub's layout, which transformers 4.x
and 5.x both load); every spelling is read, since transformers 5 saves the vision tower without `vision_model.`:

    vision.model.[vision_model.]X  ↔  vision_tower.vision_model.X | vision_tower.X
                                      | model.vision_tower.[vision_model.]X
    connector.proj.0.X             ↔  multi_modal_projector.linear_1.X | model.multi_modal_projector.linear_1.X
    connector.proj.2.X             ↔  multi_modal_projector.linear_2.X | model.multi_modal_projector.linear_2.X
    llm.<base>.X (llm.model.…)     ↔  language_model.model.X | model.language_model.X
    llm.<head>.X (llm.lm_head.…)   ↔  language_model.lm_head.X | lm_head.X

`vision_model.` on our side is there when the running transformers nests the tower (4.x) and not when it does not
(5.x); `<base>` and `<head>` are the causal LM's base-model attribute and output embeddings. Every tensor is
accounted for both ways: a name with no counterpart, a counterpart missing or a shape that differs is a UserError
naming the tensors. With tied embeddings the head is the embedding table: written once, read back under both names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (AutoConfig, AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaImageProcessor,
                          LlavaProcessor)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from mmtrain.errors import UserError
from mmtrain.model.checkpoint_configs import META_KEYS, STORAGE_KEYS
from mmtrain.model.config import VLMConfig
from mmtrain.model.llm import build_text_config
from mmtrain.model.loading_report import listing, refuse_unaccounted
from mmtrain.model.vision import vision_sub_config
from mmtrain.model.vlm import VisionLanguageModel
from mmtrain.model.weights_io import WEIGHTS_NAME, safetensors_files

LLAVA_TYPE = "llava"
IMAGE_TOKEN = "<image>"
TOWERS = {"clip_vision_model": 1, "siglip_vision_model": 0}
"""Vision towers LLaVA and mmtrain share → the tokens the tower adds before its patches (CLIP's CLS)."""
STRATEGIES = ("default", "full")
"""LLaVA's vision_feature_select_strategy: `default` drops the first (CLS) token, `full` keeps every token."""


# ---- the name table ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Our model's tensor names and shapes and, per part, its prefix beside LLaVA's (the written spelling first)."""

    parts: tuple[tuple[str, tuple[str, ...]], ...]
    shapes: dict[str, tuple[int, ...]]
    embed: str
    """Our input-embedding weight (the LLM's token table)."""
    head: str
    """Our output-head weight: the same tensor as `embed` when `tied`."""
    tied: bool

    def to_ours(self, name: str) -> str | None:
        """Our name for a LLaVA tensor name, or None when no part of ours holds it."""
        pairs = sorted(((theirs, ours) for ours, spellings in self.parts for theirs in spellings),
                       key=lambda pair: -len(pair[0]))
        return next((ours + name[len(theirs):] for theirs, ours in pairs if name.startswith(theirs)), None)

    def to_llava(self, name: str) -> str | None:
        """LLaVA's (hub layout) name for one of ours, or None when no LLaVA part holds it."""
        for ours, spellings in sorted(self.parts, key=lambda part: -len(part[0])):
            if name.startswith(ours):
                return spellings[0] + name[len(ours):]
        return None


def layout(config: VLMConfig) -> Layout:
    """The name table for `config`'s model, read off that model built on the meta device (no memory, no weights),
    so the names are the running transformers' own."""
    with torch.device("meta"):
        model = VisionLanguageModel.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    modules = {id(m): name for name, m in model.llm.named_modules()}
    embed, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    if head is None:
        raise UserError(f"LLM {config.text_config['model_type']!r} has no output head to map onto LLaVA's lm_head")
    vision = "vision.model.vision_model." if any(n.startswith("vision.model.vision_model.") for n in shapes) \
        else "vision.model."
    parts = (
        (vision, ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                  "model.vision_tower.")),
        ("connector.proj.0.", ("multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_1.")),
        ("connector.proj.2.", ("multi_modal_projector.linear_2.", "model.multi_modal_projector.linear_2.")),
        (f"llm.{model.llm.base_model_prefix}.", ("language_model.model.", "model.language_model.")),
        (f"llm.{modules[id(head)]}.", ("language_model.lm_head.", "lm_head.")),
    )
    return Layout(parts, shapes, f"llm.{modules[id(embed)]}.weight", f"llm.{modules[id(head)]}.weight",
                  head.weight is embed.weight)


# ---- LLaVA directory → mmtrain -------------------------------------------------------------------------------------
def config_from_llava(folder: str | Path) -> VLMConfig:
    """The mmtrain `mlp` config of a LLaVA directory: its vision and text configs (every field, as transformers
    reads them), its image token, its feature layer and whether the CLS token stays (strategy `full`)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"model.init_from_hf {folder}: no config.json (a LlavaForConditionalGeneration directory)")
    model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    if model_type != LLAVA_TYPE:
        raise UserError(f"model.init_from_hf {folder}: model_type {model_type!r}, not {LLAVA_TYPE!r} (mmtrain maps "
                        "LlavaForConditionalGeneration only: one image tile, one projector)")
    try:
        hf = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"model.init_from_hf {path}: transformers cannot read it: {exc}") from exc
    vision = {k: v for k, v in hf.vision_config.to_dict().items() if k not in META_KEYS + STORAGE_KEYS}
    text = {k: v for k, v in hf.text_config.to_dict().items() if k not in META_KEYS + STORAGE_KEYS}
    where = f"model.init_from_hf {path}"
    tower = vision.get("model_type")
    if tower not in TOWERS:
        raise UserError(f"{where}: vision tower {tower!r}; mmtrain maps LLaVA's {' and '.join(TOWERS)} towers")
    layer, strategy = hf.vision_feature_layer, hf.vision_feature_select_strategy
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise UserError(f"{where}: vision_feature_layer {layer!r}; mmtrain's tower returns one layer, so only a "
                        "single int layer is supported (a list concatenates several)")
    depth = int(vision["num_hidden_layers"])
    select = layer - (depth + 1) if layer >= 0 else layer  # hidden_states holds the embeddings + one per layer
    if not -(depth + 1) <= select <= -1:
        raise UserError(f"{where}: vision_feature_layer {layer} is outside the tower's {depth + 1} hidden states")
    if strategy not in STRATEGIES:
        raise UserError(f"{where}: vision_feature_select_strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if strategy == "default" and not TOWERS[tower]:
        raise UserError(f"{where}: strategy 'default' drops the first token, and a {tower} tower has no CLS token "
                        "(LLaVA would drop a patch, which mmtrain's tower never does)")
    if hf.projector_hidden_act != "gelu":
        raise UserError(f"{where}: projector_hidden_act {hf.projector_hidden_act!r}; mmtrain's mlp connector is "
                        "Linear-GELU-Linear with the exact (erf) GELU, LLaVA's 'gelu'")
    if not getattr(hf, "multimodal_projector_bias", True):
        raise UserError(f"{where}: multimodal_projector_bias false; mmtrain's mlp connector has biases")
    token = getattr(hf, "image_token_index", None)  # the field's name in config.json; image_token_id its alias
    token = getattr(hf, "image_token_id", None) if token is None else token
    return VLMConfig(connector="mlp", vision_config=vision, text_config=text, image_token_id=int(token),
                     vision_select_layer=select, vision_keep_cls=strategy == "full", connector_config={"depth": 2})


def state_from_llava(folder: str | Path, config: VLMConfig) -> dict[str, torch.Tensor]:
    """A LLaVA directory's weights under our names (dtype as stored), every tensor accounted for: a LLaVA tensor
    with no place in our model, one of ours the directory lacks, or a shape that differs is a UserError naming them.
    Tied embeddings: the head is filled from the table when the directory stores it once."""
    table = layout(config)
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unplaced, twice, mismatched = [], [], []
    for path in safetensors_files(folder, "LLaVA"):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                ours = table.to_ours(name)
                if ours is None or ours not in table.shapes:
                    unplaced.append(name if ours is None else f"{name} (as {ours})")
                    continue
                if ours in state:
                    twice.append(f"{source[ours]} and {name} (both {ours})")
                    continue
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != table.shapes[ours]:
                    mismatched.append(f"{name} {tuple(tensor.shape)} vs {ours} {table.shapes[ours]}")
                state[ours], source[ours] = tensor, name
    if twice:
        raise UserError(f"{folder}: tensors stored twice under LLaVA's two layouts: {listing(twice)}")
    if table.tied and table.embed in state:
        if table.head in state and not torch.equal(state[table.head], state[table.embed]):
            raise UserError(f"{folder}: the text config ties the embeddings, but {source[table.head]} differs from "
                            f"{source[table.embed]}")
        state[table.head] = state[table.embed]
    missing = [f"{n} (LLaVA: {table.to_llava(n)})" for n in table.shapes if n not in state]
    refuse_unaccounted(folder, "mmtrain model", missing, unplaced, mismatched)
    return state


def is_llava_dir(folder: str | Path) -> bool:
    """Whether a directory's config.json describes a LLaVA (an `mmtrain export` of the mlp connector is one)."""
    path = Path(folder) / "config.json"
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("model_type") == LLAVA_TYPE


def load_llava_dir(folder: str | Path) -> VisionLanguageModel:
    """A LLaVA directory as our model, with its weights (every tensor accounted for)."""
    config = config_from_llava(folder)
    model = VisionLanguageModel.from_config(config)
    model.load_state_dict(state_from_llava(folder, config), strict=True)
    return model


# ---- mmtrain → LLaVA directory -------------------------------------------------------------------------------------
def llava_form(config: VLMConfig) -> tuple[str, int]:
    """(vision_feature_select_strategy, num_additional_image_tokens) of `config` as a LLaVA, or a UserError naming
    what LLaVA cannot express: a connector other than mlp, an MLP of depth other than 2, a tower other than CLIP or
    SigLIP."""
    if config.connector != "mlp":
        raise UserError(f"connector {config.connector!r} has no LLaVA form: LLaVA's projector is the mlp connector")
    depth = config.connector_options().depth
    if depth != 2:
        raise UserError(f"mlp connector of depth {depth}: LLaVA's projector is Linear-GELU-Linear (depth 2)")
    tower = vision_sub_config(config.vision_config)["model_type"]
    if tower not in TOWERS:
        raise UserError(f"vision tower {tower!r} has no LLaVA form: LLaVA loads {' and '.join(TOWERS)} towers here")
    keeps_first = config.vision_keep_cls or not TOWERS[tower]  # SigLIP has no CLS: all its tokens are patches
    return ("full" if keeps_first else "default"), TOWERS[tower]


def llava_config(config: VLMConfig) -> LlavaConfig:
    """LlavaConfig of our model: our part configs, image token, feature layer and select strategy, GELU projector,
    and `image_seq_length` our slots per image."""
    strategy, _ = llava_form(config)
    tied = bool(build_text_config(config.text_config).tie_word_embeddings)
    hf = LlavaConfig(vision_config=vision_sub_config(config.vision_config), text_config=dict(config.text_config),
                     image_token_index=config.image_token_id, vision_feature_layer=config.vision_select_layer,
                     vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                     image_seq_length=config.num_image_slots(), multimodal_projector_bias=True,
                     tie_word_embeddings=tied)
    hf.architectures = ["LlavaForConditionalGeneration"]
    return hf


def llava_tensors(state: dict[str, torch.Tensor], config: VLMConfig) -> dict[str, torch.Tensor]:
    """`state` (our plain names) under LLaVA's hub names; the head is left out when tied (LLaVA ties it back).
    Every tensor accounted for, as `state_from_llava` does it."""
    table = layout(config)
    out: dict[str, torch.Tensor] = {}
    unplaced, mismatched = [], []
    if table.tied and table.head in state and table.embed in state \
            and not torch.equal(state[table.head], state[table.embed]):
        raise UserError(f"{table.head} differs from {table.embed}, but the text config ties them")
    for name, tensor in state.items():
        if table.tied and name == table.head:
            continue
        theirs = table.to_llava(name)
        if theirs is None or name not in table.shapes:
            unplaced.append(name)
        elif tuple(tensor.shape) != table.shapes[name]:
            mismatched.append(f"{name} {tuple(tensor.shape)} vs {table.shapes[name]}")
        else:
            out[theirs] = tensor.detach().to("cpu").contiguous()
    missing = [n for n in table.shapes if n not in state and not (table.tied and n == table.head)]
    refuse_unaccounted("the state to export", "LLaVA model", missing, unplaced, mismatched)
    return out


def image_processor(config: VLMConfig, image_config: dict[str, Any] | None) -> Any:
    """The trainer's preprocessing as transformers' processor: shortest side to `size` (bicubic), centre crop,
    [0, 1], normalise with mean / std. `resize: pad` (pad to a square with the mean colour first) is
    LlavaImageProcessor's `do_pad`. The size must be the tower's image_size: the slot count depends on it."""
    settings = dict(image_config or {})
    tower_size = int(vision_sub_config(config.vision_config).get("image_size", 224))
    size = int(settings.get("size") or tower_size)
    if size != tower_size:
        raise UserError(f"image size {size} but the vision tower's image_size is {tower_size}: LLaVA's processor "
                        "would expand <image> to a different number of tokens than the model has features")
    common = {"do_resize": True, "size": {"shortest_edge": size}, "resample": PILImageResampling.BICUBIC,
              "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
              "image_mean": list(settings.get("mean") or OPENAI_CLIP_MEAN),
              "image_std": list(settings.get("std") or OPENAI_CLIP_STD)}
    if settings.get("resize", "shortest") == "pad":
        return LlavaImageProcessor(do_pad=True, **common)
    return CLIPImageProcessor(**common)


def write_llava_dir(state: dict[str, torch.Tensor], config: VLMConfig, out: Path, tokenizer_dir: Path | None,
                    image_config: dict | None, chat_template: str | None = None) -> None:
    """A directory `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load:
    config.json (`llava_config`), model.safetensors in LLaVA's hub names (`llava_tensors`), preprocessor_config.json
    (`image_processor`) and, with a tokenizer, a LlavaProcessor saved by transformers (the tokenizer's files, the
    processor's settings, `chat_template`) that expands `<image>` into exactly our slots per image. Refuses, before
    writing anything, what LLaVA cannot express (`llava_form`), a tokenizer whose `<image>` is not the config's image
    token, and a chat template without a tokenizer to carry it."""
    if chat_template is not None and tokenizer_dir is None:
        raise UserError("a chat template rides on the LLaVA processor, which needs the tokenizer: pass tokenizer_dir")
    strategy, additional = llava_form(config)
    hf_config = llava_config(config)
    tensors = llava_tensors(state, config)
    images = image_processor(config, image_config)
    tokenizer = _tokenizer(Path(tokenizer_dir), config) if tokenizer_dir is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})  # HF's layout: no aliases
    images.save_pretrained(str(out))  # on its own too: AutoImageProcessor and transformers 4.x read this file
    if tokenizer is None:
        return
    patch = int(vision_sub_config(config.vision_config)["patch_size"])
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=additional,
                               chat_template=chat_template, image_token=IMAGE_TOKEN)
    processor.save_pretrained(str(out))


def _tokenizer(folder: Path, config: VLMConfig) -> Any:
    """The tokenizer to ship, refused when its `<image>` is not one token with the config's image token id."""
    if not folder.is_dir():
        raise UserError(f"tokenizer directory not found: {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if ids != [config.image_token_id]:
        raise UserError(f"{folder}: {IMAGE_TOKEN} encodes as {ids}, but the model's image token id is "
                        f"{config.image_token_id}: LLaVA's processor would place no features")
    return tokenizer
