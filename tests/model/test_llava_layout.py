"""transformers' LLaVA ↔ mmtrain's mlp model (mmtrain/model/llava_layout.py): a tiny LlavaForConditionalGeneration
saved with save_pretrained starts an mmtrain model that computes its logits; an mmtrain model written as a LLaVA
directory loads in LlavaForConditionalGeneration and AutoProcessor and computes ours; the two directions invert."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

from mmtrain.config.recipe import ModelSpec, Recipe
from mmtrain.config.stage import DataSource, StageSpec
from mmtrain.config.typed import build
from mmtrain.data.loader.images import ImageConfig, preprocess, processor_settings
from mmtrain.data.loader.tokenizer import load_tokenizer, train_tokenizer
from mmtrain.doctor.context import Context
from mmtrain.doctor.model_checks import check_model_paths
from mmtrain.errors import UserError
from mmtrain.model.llava_layout import config_from_llava, state_from_llava, write_llava_dir
from mmtrain.model.presets import tiny_config
from mmtrain.model.vlm import VisionLanguageModel
from mmtrain.train.stage_model import image_config, initial_state, model_config

VOCAB = 320
TEXT = "a red shirt <image> with white stripes"
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.26, 0.27)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llava_tok") / "tok"
    return train_tokenizer([f"a red shirt with white stripes, size {i}" for i in range(40)], VOCAB, out)


@pytest.fixture(scope="module")
def image_token(tok_dir) -> int:
    tokenizer = load_tokenizer(tok_dir)
    assert len(tokenizer) <= VOCAB
    return tokenizer.convert_tokens_to_ids("<image>")


@pytest.fixture(scope="module")
def image_png(tmp_path_factory) -> bytes:
    """96 x 64 scales to 48 x 32 exactly (no rounding apart between Pillow callers), then crops to 32 x 32."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- helpers -------------------------------------------------------------------------------------------------------
def vision(tower: str) -> dict:
    return {"model_type": tower, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def save_llava(out: Path, tok_dir: Path, image_token: int, tower: str = "clip_vision_model",
               strategy: str = "default", tied: bool = False, dtype: torch.dtype = torch.float32,
               shard: str = "5GB", **fields) -> LlavaForConditionalGeneration:
    """A tiny LLaVA (Llama 64 wide, 2 layers), its tokenizer and image processor, saved by transformers."""
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB, "tie_word_embeddings": tied}
    config = LlavaConfig(vision_config=vision(tower), text_config=text, image_token_index=image_token,
                         vision_feature_layer=fields.pop("vision_feature_layer", -2),
                         vision_feature_select_strategy=strategy, tie_word_embeddings=tied, **fields)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.to(dtype).save_pretrained(out, max_shard_size=shard)
    load_tokenizer(tok_dir).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(MEAN),
                       image_std=list(STD)).save_pretrained(out)
    return model


def ids_with_image(slots: int, image_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [5, 17, 42] + [image_token] * slots + [9, 77, 31, 100]
    return torch.tensor([ids]), torch.tensor([[0, 3]])


def ours_from(folder: Path) -> VisionLanguageModel:
    config = config_from_llava(folder)
    model = VisionLanguageModel.from_config(config).eval()
    model.load_state_dict(state_from_llava(folder, config), strict=True)
    return model


STAGES = [StageSpec(name="s", data=[DataSource(shards="unread")])]


def recipe_for(folder: Path, tokenizer: Path) -> Recipe:
    return Recipe(name="llava", stages=STAGES, model=ModelSpec(init_from_hf=str(folder)), tokenizer=str(tokenizer))


# ---- LLaVA → mmtrain -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower, strategy, slots", [("clip_vision_model", "default", 16),
                                                    ("clip_vision_model", "full", 17),
                                                    ("siglip_vision_model", "full", 16)])
def test_a_llava_starts_an_mmtrain_model_with_its_logits(tmp_path, tok_dir, image_token, tower, strategy, slots):
    theirs = save_llava(tmp_path / "llava", tok_dir, image_token, tower, strategy)
    ours = ours_from(tmp_path / "llava")
    config = ours.config
    assert (config.connector, config.connector_config, config.vision_select_layer, config.vision_keep_cls,
            config.image_token_id, config.num_image_slots()) == ("mlp", {"depth": 2}, -2, strategy == "full",
                                                                 image_token, slots)
    ids, image_slots = ids_with_image(slots, image_token)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels).logits
        got = ours(input_ids=ids, pixel_values=pixels, image_slots=image_slots).logits
        blank = ours(input_ids=ids, pixel_values=torch.zeros_like(pixels), image_slots=image_slots).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(got, blank, atol=1e-3)  # the image reaches the logits


def test_the_recipe_path_reads_config_weights_tokenizer_and_image_settings(tmp_path, tok_dir, image_token):
    save_llava(tmp_path / "llava", tok_dir, image_token, dtype=torch.bfloat16, vision_feature_layer=2)  # of 4
    path = tmp_path / "llava" / "config.json"
    hub = json.loads(path.read_text())
    for part in ("text_config", "vision_config"):  # as the hub's LLaVA configs have it
        hub[part]["torch_dtype"] = "float16"
    path.write_text(json.dumps(hub))
    recipe = recipe_for(tmp_path / "llava", tmp_path / "llava")
    config = model_config(recipe, load_tokenizer(recipe.tokenizer))
    assert config.vision_select_layer == -2 and config.vision_path is None and config.llm_path is None
    state, model = initial_state(recipe, config), VisionLanguageModel.from_config(config)
    assert set(state) == set(model.state_dict()) and {t.dtype for t in state.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the stored dtype is not the model's
    images = image_config(recipe, config)
    assert (images.size, images.mean, images.std, images.resize) == (32, MEAN, STD, "shortest")


def test_the_tokenizers_image_token_must_be_the_llavas(tmp_path, tok_dir, image_token):
    save_llava(tmp_path / "llava", tok_dir, image_token + 1)
    recipe = recipe_for(tmp_path / "llava", tok_dir)
    with pytest.raises(UserError, match=rf"<image> is id {image_token}, but .* image token is id {image_token + 1}"):
        model_config(recipe, load_tokenizer(recipe.tokenizer))


def test_tied_embeddings_fill_the_head(tmp_path, tok_dir, image_token):
    theirs = save_llava(tmp_path / "llava", tok_dir, image_token, tied=True)
    stored = load_file(str(tmp_path / "llava" / "model.safetensors"))
    assert not any("lm_head" in name for name in stored)  # transformers stores the table once
    ours = ours_from(tmp_path / "llava")
    assert ours.llm.get_output_embeddings().weight is ours.llm.get_input_embeddings().weight
    ids, image_slots = ids_with_image(16, image_token)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, pixel_values=pixels, image_slots=image_slots).logits,
                                   theirs(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)


def test_a_sharded_llava_is_read_whole(tmp_path, tok_dir, image_token):
    theirs = save_llava(tmp_path / "llava", tok_dir, image_token, shard="60KB")
    assert len(list((tmp_path / "llava").glob("model-*.safetensors"))) > 1
    assert not (tmp_path / "llava" / "model.safetensors").exists()
    ours = ours_from(tmp_path / "llava")
    ids, image_slots = ids_with_image(16, image_token)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, pixel_values=pixels, image_slots=image_slots).logits,
                                   theirs(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)


def test_every_llava_tensor_is_accounted_for(tmp_path, tok_dir, image_token):
    save_llava(tmp_path / "llava", tok_dir, image_token)
    weights = tmp_path / "llava" / "model.safetensors"
    stored = load_file(str(weights))
    save_file({**stored, "multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(UserError, match=r"1 checkpoint tensor\(s\) with no place in the mmtrain model: "
                                        r"multi_modal_projector\.linear_3\.weight$"):
        ours_from(tmp_path / "llava")
    save_file({k: v for k, v in stored.items() if k != "multi_modal_projector.linear_2.bias"}, str(weights))
    with pytest.raises(UserError, match=r"1 mmtrain model parameter\(s\) the checkpoint does not have: "
                                        r"connector\.proj\.2\.bias \(LLaVA: multi_modal_projector\.linear_2\.bias\)"):
        ours_from(tmp_path / "llava")


@pytest.mark.parametrize("fields, message", [
    ({"vision_feature_layer": [-2, -1]}, "only a single int layer is supported"),
    ({"tower": "siglip_vision_model", "strategy": "default"}, "has no CLS token"),
    ({"projector_hidden_act": "silu"}, "projector_hidden_act 'silu'"),
])
def test_llavas_mmtrain_cannot_express_are_refused(tmp_path, tok_dir, image_token, fields, message):
    save_llava(tmp_path / "llava", tok_dir, image_token, **fields)
    with pytest.raises(UserError, match=message):
        config_from_llava(tmp_path / "llava")


def test_the_doctors_model_row_reads_the_llava(tmp_path, tok_dir, image_token):
    save_llava(tmp_path / "llava", tok_dir, image_token)
    recipe = recipe_for(tmp_path / "llava", tmp_path / "llava")
    check = check_model_paths(Context(recipe, 1, "cpu", "fp32", tmp_path / "run"))
    assert (check.status, check.detail) == \
        ("PASS", f"model.init_from_hf {tmp_path / 'llava'}: a LLaVA mmtrain maps, weights present")
    (tmp_path / "llava" / "model.safetensors").unlink()
    check = check_model_paths(Context(recipe, 1, "cpu", "fp32", tmp_path / "run"))
    assert check.status == "FAIL" and check.detail.startswith(f"{tmp_path / 'llava'}: no model.safetensors")


def test_init_from_hf_is_the_whole_model():
    stages = [{"name": "s", "data": ["unread"]}]
    with pytest.raises(UserError, match="^model.init_from_hf cannot be combined with model.preset, model.llm_path"):
        build(Recipe, {"name": "r", "stages": stages,
                       "model": {"init_from_hf": "/llava", "preset": "tiny", "llm_path": "/llm"}})
    with pytest.raises(UserError, match="^model.connector is 'abstractor', but a LLaVA"):
        build(Recipe, {"name": "r", "stages": stages, "model": {"init_from_hf": "/llava", "connector": "abstractor"}})
    assert build(Recipe, {"name": "r", "stages": stages, "model": {"init_from_hf": "/llava", "connector": "mlp"}})


# ---- mmtrain → LLaVA -----------------------------------------------------------------------------------------------
def our_model(image_token: int, tower: str = "clip_vision_model", keep_cls: bool = False, tied: bool = False,
              **fields) -> VisionLanguageModel:
    torch.manual_seed(3)
    config = tiny_config(fields.pop("connector", "mlp"), vision_family=tower, vocab_size=VOCAB, layers=2,
                         image_token_id=image_token, vision_select_layer=-2, vision_keep_cls=keep_cls, **fields)
    config.text_config["tie_word_embeddings"] = tied
    return VisionLanguageModel.from_config(config).eval()


def image_settings(resize: str = "shortest") -> dict:
    return {"size": 32, "mean": list(MEAN), "std": list(STD), "resize": resize, "augment": False, "hflip": False}


@pytest.mark.parametrize("tower, keep_cls, tied", [("clip_vision_model", False, False),
                                                   ("clip_vision_model", True, True),
                                                   ("siglip_vision_model", True, False)])
def test_the_export_loads_in_transformers_with_our_logits(tmp_path, tok_dir, image_token, image_png, tower,
                                                          keep_cls, tied):
    ours = our_model(image_token, tower, keep_cls, tied)
    out = tmp_path / "llava"
    write_llava_dir(ours.state_dict(), ours.config, out, tok_dir, image_settings(), chat_template="{{ 'x' }}")
    theirs, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: sorted(v) for k, v in info.items()} == \
        {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == "{{ 'x' }}"
    batch = processor(text=TEXT, images=Image.open(io.BytesIO(image_png)), return_tensors="pt")
    ids = batch["input_ids"]
    assert int((ids == image_token).sum()) == ours.num_image_slots
    start = int((ids[0] == image_token).nonzero()[0])
    row = ids[0].tolist()
    assert [t for i, t in enumerate(row) if t != image_token or i == start] == load_tokenizer(tok_dir)(TEXT).input_ids
    pixels = preprocess(image_png, ImageConfig(**image_settings()))[None]
    torch.testing.assert_close(batch["pixel_values"], pixels, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = ours(input_ids=ids, pixel_values=pixels, image_slots=torch.tensor([[0, start]])).logits
        got = theirs.eval()(input_ids=ids, attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_export_then_init_from_hf_gives_the_same_model(tmp_path, tok_dir, image_token, tied):
    ours = our_model(image_token, tied=tied)
    write_llava_dir(ours.state_dict(), ours.config, tmp_path / "llava", tok_dir, image_settings("pad"))
    config = config_from_llava(tmp_path / "llava")
    for field in ("connector", "image_token_id", "vision_select_layer", "vision_keep_cls"):
        assert getattr(config, field) == getattr(ours.config, field), field
    assert config.connector_options() == ours.config.connector_options()
    for part in ("vision_config", "text_config"):
        mine, back = getattr(ours.config, part), getattr(config, part)
        assert {k: back.get(k) for k in mine} == mine, part
    state, before = state_from_llava(tmp_path / "llava", config), ours.state_dict()
    assert set(state) == set(before)
    assert all(torch.equal(state[k], before[k]) for k in before)
    assert processor_settings(tmp_path / "llava") == {"size": 32, "mean": MEAN, "std": STD, "resize": "pad"}


def test_the_pad_processor_pads_as_the_trainer_does(tmp_path, tok_dir, image_token, image_png):
    """resize: pad is LlavaImageProcessor's do_pad (a mean of 0.4 is the same fill colour rounded or truncated)."""
    ours = our_model(image_token)
    settings = {**image_settings("pad"), "mean": [0.4, 0.4, 0.4]}
    write_llava_dir(ours.state_dict(), ours.config, tmp_path / "llava", tok_dir, settings)
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    theirs = processor(text=TEXT, images=Image.open(io.BytesIO(image_png)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, preprocess(image_png, ImageConfig(**settings))[None], atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    ({"connector": "abstractor"}, "connector 'abstractor' has no LLaVA form"),
    ({"connector_config": {"depth": 1}}, r"depth 1: LLaVA's projector is Linear-GELU-Linear \(depth 2\)"),
    ({"tower": "vit"}, "vision tower 'vit' has no LLaVA form"),
    ({"extra": True}, r"with no place in the LLaVA model: llm\.model\.extra$"),
    ({"image_token": 7}, "<image> encodes as .*, but the model's image token id is 7"),
    ({"image_size": 64}, "image size 64 but the vision tower's image_size is 32"),
    ({"no_tokenizer": True}, "a chat template rides on the LLaVA processor, which needs the tokenizer"),
])
def test_what_llava_cannot_express_is_refused_before_writing(tmp_path, tok_dir, image_token, change, message):
    change = dict(change)
    extra, token = change.pop("extra", False), change.pop("image_token", image_token)
    images = {**image_settings(), "size": change.pop("image_size", 32)}
    tokenizer, template = (None, "{{ 'x' }}") if change.pop("no_tokenizer", False) else (tok_dir, None)
    ours = our_model(token, change.pop("tower", "clip_vision_model"), **change)
    state = {**ours.state_dict(), **({"llm.model.extra": torch.zeros(1)} if extra else {})}
    with pytest.raises(UserError, match=message):
        write_llava_dir(state, ours.config, tmp_path / "llava", tokenizer, images, template)
    assert not (tmp_path / "llava").exists()
