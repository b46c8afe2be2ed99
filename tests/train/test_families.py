"""The LLM families and towers a recipe takes as stock checkpoints: Llama-3 (GQA, tied embeddings, llama3 rope),
Mistral, Gemma (tied, its √hidden embedding scale), Phi-3 (fused qkv_proj / gate_up_proj), Qwen2 (biases); CLIP and
SigLIP towers; each connector meets a non-Llama family once. Each family: a tiny random checkpoint pair saved with
save_pretrained (+ the tower's image processor), a recipe naming a connector and the two directories, and two stages
on 2 ranks under ZeRO-3: stage 1 trains tower + connector beside the frozen LLM, stage 2 LoRA on the LLM by role."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import metrics, stage, write_recipe
from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel,
                          GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig,
                          SiglipVisionModel)

from mmtrain.config import load_recipe
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.launching import run_ranks
from mmtrain.model import VisionLanguageModel
from mmtrain.model.llava_layout import load_llava_dir
from mmtrain.model.vision import UNUSED
from mmtrain.model.weights_io import lora_layers, read_weights
from mmtrain.train.checkpoint import list_complete
from mmtrain.train.export import export_checkpoint
from mmtrain.train.stage_model import build_stage_model, initial_state, model_config

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
TINY_CONNECTORS: dict[str, dict[str, Any]] = {
    "abstractor": {"num_queries": 8, "num_layers": 1, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128},
    "xattn": {"num_latents": 8, "resampler_depth": 1, "resampler_heads": 2, "resampler_dim_head": 16,
              "cross_attn_every": 2, "xattn_heads": 2, "xattn_dim_head": 16, "ff_mult": 2},
    "layerwise": {"num_tokens": 4, "abstractor_layers": 1, "abstractor_hidden_size": 64, "abstractor_heads": 4,
                  "abstractor_intermediate_size": 128, "adapter_rank": 8},
    "mlp": {},
}


@dataclass(frozen=True)
class Family:
    llm: Callable[[], PreTrainedModel]
    """A tiny random model in the family's stock layout (vocabularies below the tokenizer's 400 grow)."""
    tower: str
    connector: str
    adapted: tuple[str, ...] = ATTENTION + FFN
    """The linears of each decoder layer that LoRA roles self_attn + ffn adapt."""
    template: str = "owl"
    """`chat`: the run's tokenizer carries CHAT_TEMPLATE and the recipe trains with it."""


FAMILIES = {
    "llama3": Family(lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=256, tie_word_embeddings=True, rope_theta=500000.0, **SIZES,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128})), "clip", "abstractor", template="chat"),
    "mistral": Family(lambda: MistralForCausalLM(MistralConfig(vocab_size=512, sliding_window=256, **SIZES)),
                      "siglip", "xattn"),
    "gemma": Family(lambda: GemmaForCausalLM(GemmaConfig(vocab_size=320, head_dim=16, **SIZES)), "clip", "layerwise"),
    "phi3": Family(lambda: Phi3ForCausalLM(Phi3Config(  # long rope: rows past 64 tokens switch to long factors
        vocab_size=384, pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=64, **SIZES,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8})),
                   "siglip", "mlp", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "qwen2": Family(lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=512, **SIZES)), "siglip", "mlp"),
}


CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token if loop.first else '' }}"
                 "{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
                 "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant: {% endif %}")
"""A jinja chat template in the tokenizer, as a stock instruct checkpoint ships one: turns end with EOS."""


def with_chat_template(tokenizer: Path, out: Path) -> Path:
    """A copy of the test tokenizer that carries CHAT_TEMPLATE."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return out


def save_tower(kind: str, out: Path) -> None:
    torch.manual_seed(1)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8}
    if kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**sizes)).save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    else:
        SiglipVisionModel(SiglipVisionConfig(**sizes)).save_pretrained(out)
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    for kind in ("clip", "siglip"):
        save_tower(kind, root / kind)
    return {kind: root / kind for kind in ("clip", "siglip")}


TRAINED = ("gemma", "llama3", "mistral", "phi3")
"""The families trained on 2 ranks (about 12 s each): every connector once, a non-Llama family for three of them.
Qwen2 trains on 2 ranks inside a LLaVA (`test_an_existing_llava_trains_two_stages_and_exports_as_llava`)."""


@pytest.fixture(scope="module")
def family(request, tmp_path_factory, towers) -> tuple[str, Family, Path, Path]:
    """(name, family, LLM directory, tower directory)."""
    name = request.param
    torch.manual_seed(0)
    llm = tmp_path_factory.mktemp("llms") / name
    FAMILIES[name].llm().save_pretrained(llm)
    return name, FAMILIES[name], llm, towers[FAMILIES[name].tower]


def recipe_for(tmp_path: Path, tiny_data: dict[str, Path], family: tuple[str, Family, Path, Path]) -> Path:
    _, spec, llm, tower = family
    if spec.template == "chat":
        tiny_data = {**tiny_data, "tokenizer": with_chat_template(tiny_data["tokenizer"], tmp_path / "chat-tokenizer")}
    return write_recipe(tmp_path / "recipe.yaml", tiny_data, [
        stage("align", tiny_data, train={"vision": True, "connector": True, "llm": "frozen"}, steps=3,
              optimizer={"lr": 1e-3}),
        stage("lora", tiny_data, train={"vision": False, "connector": False, "llm": "lora"},
              lora={"roles": ["self_attn", "ffn"], "r": 4, "alpha": 8}, steps=2, optimizer={"lr": 1e-3}),
    ], model={"connector": spec.connector, "vision_path": str(tower), "llm_path": str(llm),
              "config": {"connector_config": TINY_CONNECTORS[spec.connector]}}, template=spec.template)


def assert_llm_is_the_checkpoints(state: dict[str, torch.Tensor], llm: Path, tied: bool) -> None:
    """Every LLM tensor of `state` is the checkpoint's, tensor for tensor; a vocabulary the tokenizer grew keeps the
    checkpoint's rows and starts its new rows at their mean; tied embeddings stay one tensor."""
    saved = load_file(str(llm / "model.safetensors"))
    ours = {n.removeprefix("llm."): t for n, t in state.items() if n.startswith("llm.")}
    assert ours.keys() - saved.keys() == ({"lm_head.weight"} if tied else set())
    assert saved.keys() <= ours.keys()
    for name, tensor in saved.items():
        rows = tensor.shape[0]
        assert torch.equal(ours[name][:rows], tensor), name
        if ours[name].shape != tensor.shape:  # grown: every new row is the mean of the checkpoint's
            assert torch.equal(ours[name][rows:], tensor.mean(dim=0).expand_as(ours[name][rows:])), name
    if tied:
        assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])


def tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's tensors under the names its own checkpoint gives them (transformers 4.x nests `vision_model.`)."""
    return {n.removeprefix("vision.model.").removeprefix("vision_model."): t for n, t in state.items()
            if n.startswith("vision.")}


def adapted_names(spec: Family, layers: int) -> set[str]:
    block = {p: "self_attn" if p in ATTENTION + ("qkv_proj",) else "mlp" for p in spec.adapted}
    return {f"llm.model.layers.{i}.{block[p]}.{p}" for i in range(layers) for p in spec.adapted}


def connector_ffn(spec: Family) -> set[str]:
    """What the ffn role adapts in a frozen connector: xattn's FFN (one gated block here), nothing elsewhere."""
    return {f"connector.blocks.0.ff.{p}" for p in ("fc1", "fc2")} if spec.connector == "xattn" else set()


def image_batch(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Two samples, the first with an image after two text tokens (its slots, or its position for layerwise)."""
    slots = model.num_image_slots
    ids = torch.randint(10, 300, (2, slots + 8), generator=torch.Generator().manual_seed(0))
    ids[0, 2:2 + slots] = model.config.image_token_id
    size = model.vision.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": ids.masked_fill(ids == model.config.image_token_id, -100),
            "pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),
            "image_slots": torch.tensor([[0, 2]])}


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES), indirect=True)
def test_a_family_loads_whole_from_its_checkpoints(tmp_path, tiny_data, family) -> None:
    """One process, no ranks: the model from the two directories holds every checkpoint tensor; stage 2's build
    (from the config, those weights loaded after, every tensor accounted, LoRA injected) computes the same logits,
    buffers included (rope scaling, Gemma's embedding scale), and adapts exactly the family's projections."""
    name, spec, llm, tower = family
    recipe = load_recipe(recipe_for(tmp_path, tiny_data, family))
    config = model_config(recipe, load_tokenizer(recipe.tokenizer))
    assert config.text_config["vocab_size"] >= 400  # the tokenizer's 400 tokens, rounded up to 64
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config, pretrained=True).eval()
    for module in model.connector.modules():  # open the conditioning connectors' gates: their hooks count
        for gate in ("gate", "attn_gate", "ff_gate"):
            if isinstance(getattr(module, gate, None), torch.nn.Parameter):
                getattr(module, gate).fill_(0.5)
    state = model.state_dict()
    tied = bool(model.llm.config.tie_word_embeddings)
    assert tied == (name in ("llama3", "gemma"))
    assert_llm_is_the_checkpoints(state, llm, tied)
    assert (name == "qwen2") == any(n.endswith("q_proj.bias") for n in load_file(str(llm / "model.safetensors")))
    theirs = {n.removeprefix("vision_model."): t for n, t in load_file(str(tower / "model.safetensors")).items()}
    ours = tower_state(state)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], t) for n, t in theirs.items())
    built, _ = build_stage_model(config, recipe.stages[1], None, False, state, rank=0, seed=0, checkpointing={})
    batch = image_batch(model)
    assert torch.equal(built.eval()(**batch).logits, model(**batch).logits)  # LoRA B starts at 0: adds exact zeros
    assert {n for n, _ in lora_layers(built)} == adapted_names(spec, 2) | connector_ffn(spec)


@pytest.mark.parametrize("family", TRAINED, indirect=True)
def test_two_stages_train_a_family_from_its_checkpoints(tmp_path, tiny_data, family) -> None:
    """Stage 1 trains every tower tensor the features pass through and every connector tensor, and leaves the LLM
    the checkpoint's; stage 2 moves exactly the LoRA-adapted linears (merged), nothing of the tower or connector
    (xattn's own FFN aside: the ffn role adapts it when the connector is frozen)."""
    name, spec, llm, tower = family
    recipe = recipe_for(tmp_path, tiny_data, family)
    run = tmp_path / "run"
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(run)], log=tmp_path / "train.log", timeout=600)
    assert result.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    align = read_weights(run / "stages" / "align")
    lora = read_weights(run / "stages" / "lora")
    tied = name in ("llama3", "gemma")
    assert_llm_is_the_checkpoints(align, llm, tied)
    # stage 1: the tower's used tensors and the connector's all moved from where they started, nothing else did
    loaded = load_recipe(recipe)
    start = initial_state(loaded, model_config(loaded, load_tokenizer(loaded.tokenizer)))
    assert align.keys() == start.keys() == lora.keys()
    moved = {n for n in align if not torch.equal(align[n], start[n])}
    used_tower = {n for n in align if n.startswith("vision.") and not UNUSED.search(n)}
    assert moved == used_tower | {n for n in align if n.startswith("connector.")}
    # stage 2: exactly the adapted linears (and xattn's FFN, which the ffn role adapts in a frozen connector)
    moved = {n for n in align if not torch.equal(align[n], lora[n])}
    assert moved == {f"{n}.weight" for n in adapted_names(spec, 2) | connector_ffn(spec)}
    assert len(metrics(run)) == 5
    assert_export_opens_in_transformers(run, tmp_path / "export", spec)


@torch.no_grad()
def assert_export_opens_in_transformers(run: Path, out: Path, spec: Family) -> None:
    """`mmtrain export --merge-lora` of the last checkpoint: transformers alone (LLaVA for mlp, the travelling
    modeling code for the others) and mmtrain's own loader give the logits of the trained model."""
    export_checkpoint(list_complete(run / "checkpoints")[-1].path, out, merge=True)
    ours = VisionLanguageModel.from_pretrained(run / "stages" / "lora").eval()
    batch = image_batch(ours)
    expected = ours(**batch).logits
    if spec.connector == "mlp":
        theirs = LlavaForConditionalGeneration.from_pretrained(out).eval()
        logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"]).logits
        reloaded = load_llava_dir(out).eval()
    else:
        theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert type(theirs).__module__.startswith("transformers_modules")
        logits = theirs(**batch).logits
        reloaded = VisionLanguageModel.from_pretrained(out).eval()
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
    assert json.loads((out / "mmtrain.json").read_text())["template"] == spec.template
    if spec.template == "chat":  # the tokenizer travels with its chat template
        assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHAT_TEMPLATE


def save_llava(out: Path, tokenizer: Path) -> Path:
    """A tiny LlavaForConditionalGeneration of a Qwen2 (biases) and a SigLIP tower, saved by transformers, with the
    run's tokenizer (its `<image>` is the LLaVA's image token) and an image processor."""
    image_token = load_tokenizer(tokenizer).convert_tokens_to_ids("<image>")
    text = {"model_type": "qwen2", "vocab_size": 448, **SIZES}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    torch.manual_seed(2)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                              vision_feature_layer=-2, vision_feature_select_strategy="full")
                                  ).save_pretrained(out)
    load_tokenizer(tokenizer).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_an_existing_llava_trains_two_stages_and_exports_as_llava(tmp_path, tiny_data) -> None:
    """`model: {init_from_hf: LLAVA}`: stage 1 starts from the LLaVA's own weights (the frozen Qwen2 stays them,
    biases included), stage 2's LoRA moves exactly the adapted linears, and the export is a LLaVA again whose logits
    are the trained model's."""
    llava = save_llava(tmp_path / "llava", tiny_data["tokenizer"])
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, [
        stage("align", tiny_data, train={"vision": True, "connector": True, "llm": "frozen"}, steps=3,
              optimizer={"lr": 1e-3}),
        stage("lora", tiny_data, train={"vision": False, "connector": False, "llm": "lora"},
              lora={"roles": ["self_attn", "ffn"], "r": 4, "alpha": 8}, steps=2, optimizer={"lr": 1e-3}),
    ], model={"init_from_hf": str(llava)})
    run = tmp_path / "run"
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(run)], log=tmp_path / "train.log", timeout=600)
    assert result.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    model = load_llava_dir(llava)
    start, unused = model.state_dict(), {f"vision.{n}" for n in model.vision.unused_parameter_names()}
    align, lora = read_weights(run / "stages" / "align"), read_weights(run / "stages" / "lora")
    assert align.keys() == start.keys() == lora.keys()
    llm = [n for n in start if n.startswith("llm.")]
    assert any(n.endswith("q_proj.bias") for n in llm)
    assert all(torch.equal(align[n], start[n]) for n in llm)
    assert {n for n in align if not torch.equal(align[n], start[n])} == \
        {n for n in align if n.startswith(("connector.", "vision.")) and n not in unused}
    moved = {n for n in align if not torch.equal(align[n], lora[n])}
    assert moved == {f"{n}.weight" for n in adapted_names(FAMILIES["qwen2"], 2)}
    assert_export_opens_in_transformers(run, tmp_path / "export", FAMILIES["qwen2"])
