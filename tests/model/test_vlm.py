"""The composite model: bare-LLM equivalence, text-only batches, splicing, save / load."""

from __future__ import annotations

import pytest
import torch

from mmtrain.model.vlm import VisionLanguageModel
from vlm_helpers import build_bare, make_batch, make_model, set_gates


def _logits(model, batch, **extra):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, **extra).logits


@pytest.mark.parametrize("connector", ["xattn", "layerwise"])
def test_zero_gates_give_the_bare_llm_logits(connector):
    model = make_model(connector)
    batch = make_batch(model, images_per_sample=(2, 1))
    bare = build_bare(model)
    with torch.no_grad():
        expected = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-6)
    set_gates(model, 0.5)  # the same comparison fails once the gates open: the images now matter
    assert (_logits(model, batch) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("connector", ["xattn", "layerwise"])
def test_open_gates_only_affect_tokens_after_the_image(connector):
    model = make_model(connector)
    set_gates(model, 0.5, suffix="attn_gate" if connector == "xattn" else "gate")  # xattn's FFN acts on every token
    batch = make_batch(model, images_per_sample=(1,))
    start = int(batch["image_slots"][0, 1])
    expected = build_bare(model)(input_ids=batch["input_ids"]).logits.detach()
    logits = _logits(model, batch)
    torch.testing.assert_close(logits[:, :start], expected[:, :start], rtol=0, atol=1e-6)
    assert (logits[:, start:] - expected[:, start:]).abs().max() > 1e-3


@pytest.mark.parametrize("connector", ["abstractor", "mlp", "xattn", "layerwise"])
def test_text_only_batch_loss_equals_bare_llm_loss(connector):
    model = make_model(connector)
    # even with open attention gates the dummy image contributes exactly nothing (xattn's FFN gate stays shut:
    # Flamingo's dense FFN acts on text with or without images)
    set_gates(model, 0.5, suffix="attn_gate" if connector == "xattn" else "gate")
    batch = make_batch(model, images_per_sample=(0, 0))
    assert batch["pixel_values"].shape[0] == 0
    out = model(**batch)
    expected = build_bare(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)
    out.loss.backward()  # the dummy vision path is in the graph (same graph on every rank), with zero gradient
    vision_grads = [p.grad for p in model.vision.parameters() if p.grad is not None]
    assert vision_grads and all(float(g.abs().max()) == 0.0 for g in vision_grads)


def test_text_only_sample_in_a_mixed_batch_matches_the_bare_llm():
    model = make_model("abstractor")
    batch = make_batch(model, images_per_sample=(2, 0))
    length = int(batch["attention_mask"][1].sum())
    expected = build_bare(model)(input_ids=batch["input_ids"][1:, :length]).logits.detach()
    torch.testing.assert_close(_logits(model, batch)[1:, :length], expected, rtol=0, atol=1e-5)


def test_two_images_land_at_their_own_slots():
    model = make_model("abstractor")
    batch = make_batch(model, images_per_sample=(2, 1))
    with torch.no_grad():
        embeds = model.prepare_inputs(batch["input_ids"], batch["pixel_values"], batch["image_slots"])
        tokens = model.connector(model.vision(batch["pixel_values"]))
    assert batch["image_slots"].tolist() == [[0, 2], [0, 69], [1, 2]]
    for i, (sample, start) in enumerate(batch["image_slots"].tolist()):
        torch.testing.assert_close(embeds[sample, start : start + 65], tokens[i], rtol=0, atol=0)
    # swapping the two images of sample 0 swaps their tokens in the sequence
    swapped = dict(batch, pixel_values=batch["pixel_values"][[1, 0, 2]])
    with torch.no_grad():
        embeds2 = model.prepare_inputs(swapped["input_ids"], swapped["pixel_values"], swapped["image_slots"])
    torch.testing.assert_close(embeds2[0, 2:67], tokens[1], rtol=0, atol=0)
    torch.testing.assert_close(embeds2[0, 69:134], tokens[0], rtol=0, atol=0)
    # text positions are the token embeddings
    text = model.llm.get_input_embeddings()(batch["input_ids"][0, 67:69])
    torch.testing.assert_close(embeds[0, 67:69], text, rtol=0, atol=0)


def test_placeholder_count_mismatch_raises_with_both_numbers():
    model = make_model("abstractor")
    batch = make_batch(model, images_per_sample=(1, 0))
    batch["input_ids"][0, 2] = 5  # one placeholder fewer
    with pytest.raises(ValueError, match=r"64 image placeholder tokens .* 1 images x 65 slots = 65 features"):
        model(**batch)
    model_x = make_model("xattn")
    batch = make_batch(model_x, images_per_sample=(1, 1))
    with pytest.raises(ValueError, match=r"2 image placeholder tokens .* 1 images x 1 slots = 1 features"):
        model_x(**dict(batch, pixel_values=batch["pixel_values"][:1], image_slots=batch["image_slots"][:1]))


def test_position_ids_pass_through_to_the_llm():
    model = make_model("mlp")
    batch = make_batch(model, images_per_sample=(1,))
    length = batch["input_ids"].shape[1]
    default = _logits(model, batch)
    torch.testing.assert_close(_logits(model, batch, position_ids=torch.arange(length)[None]), default, rtol=0, atol=1e-6)
    packed = torch.cat([torch.arange(5), torch.arange(length - 5)])[None]  # a second packed sample restarts at 0
    logits = _logits(model, batch, position_ids=packed)
    torch.testing.assert_close(logits[:, :5], default[:, :5], rtol=0, atol=1e-6)
    assert (logits[:, 5:] - default[:, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("connector, family", [("abstractor", "llama"), ("mlp", "qwen2"), ("xattn", "llama"), ("layerwise", "qwen2")])
def test_save_load_round_trip_gives_identical_logits(tmp_path, connector, family):
    model = make_model(connector, llm_family=family)
    set_gates(model, 0.3)
    batch = make_batch(model, images_per_sample=(2, 1))
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)


def test_save_load_keeps_tied_embeddings(tmp_path):
    model = make_model("mlp", llm_family="qwen2")
    model.config.text_config["tie_word_embeddings"] = True
    model = VisionLanguageModel.from_config(model.config).eval()
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight
    batch = make_batch(model)
    torch.testing.assert_close(_logits(loaded.eval(), batch), _logits(model, batch), rtol=0, atol=0)


def test_xattn_works_on_a_gpt_neox_llm_and_layerwise_says_what_it_needs():
    model = make_model("xattn", llm_family="gpt_neox")
    batch = make_batch(model, images_per_sample=(1, 2))
    expected = build_bare(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"separate q/k/v/o projections; GPTNeoXAttention lacks \['q_proj'"):
        make_model("layerwise", llm_family="gpt_neox")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("connector", ["xattn", "layerwise"])
def test_gradient_checkpointing_gives_the_same_gradients(connector):
    """The hooks' media stay set through backward, so recomputed layers see the same images."""
    grads = []
    for checkpointing in (False, True):
        model = make_model(connector).train()
        set_gates(model, 0.5)
        if checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**make_batch(model, images_per_sample=(1, 2))).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
