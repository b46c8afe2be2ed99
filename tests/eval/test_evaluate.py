"""evaluate() on an untrained tiny model: the plumbing (prompts, batching, loss, blank images, files) is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.templates import Renderer
from mmtrain.eval import evaluate, format_table, majority_baseline, write_results
from mmtrain.eval.evaluate import flat_metrics, read_samples
from mmtrain.eval.generate import GREY, Generator, load_model


def test_prompt_is_the_training_render_cut_before_the_answer(tiny):
    loaded = load_model(tiny["model"])
    gen = Generator(loaded)
    record, item = read_samples(tiny["shards"], "val", ["category"], 1)[0]
    prompt = gen.prompt(record["conversation"][:-1], record["images"], item["reference"])
    full = Renderer(loaded.tokenizer, "owl", loaded.model.num_image_slots).render(record["conversation"])
    answer_len = len(prompt.answer_ids)
    assert full.input_ids[:len(prompt) + answer_len] == prompt.input_ids + prompt.answer_ids
    assert [t for t in full.labels if t != -100] == prompt.answer_ids  # answer + EOS, exactly what training learns
    assert prompt.answer_ids[-1] == loaded.tokenizer.eos_token_id
    assert loaded.tokenizer.decode(prompt.input_ids).endswith("AI: ")
    assert prompt.image_starts == full.image_starts and len(prompt.images) == 1
    bare = gen.prompt(record["conversation"][:-1], record["images"])
    assert bare.input_ids == prompt.input_ids and bare.answer_ids == []
    # multi-turn: the history's answer stays in the prompt, the new prompt ends at the new assistant marker
    history = record["conversation"] + [{"role": "user", "content": "And its colour?"}]
    two = gen.prompt(history, record["images"])
    assert two.input_ids[:len(prompt) + answer_len] == prompt.input_ids + prompt.answer_ids
    assert loaded.tokenizer.decode(two.input_ids).endswith("Human: And its colour?\nAI: ")
    with pytest.raises(ValueError, match="marks but 0 images"):
        gen.prompt(record["conversation"][:-1], [])


@pytest.mark.parametrize("which", ["model", "layerwise"])
def test_batched_greedy_generation_equals_one_by_one(tiny, layerwise_model, which):
    gen = Generator(load_model(tiny["model"] if which == "model" else layerwise_model))
    samples = read_samples(tiny["shards"], "val", None, 10)
    prompts = [gen.prompt(r["conversation"][:-1], r["images"]) for r, _ in samples]
    assert len({len(p) for p in prompts}) > 3  # different lengths: left padding is exercised
    batched = gen.generate(prompts, max_new_tokens=6, batch_size=10)
    single = [gen.generate([p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1  # the answers depend on the prompt


def test_evaluate_metrics_loss_and_files(tiny, tmp_path):
    preds: list = []
    metrics = evaluate(tiny["model"], tiny["shards"], batch_size=8, max_new_tokens=4, predictions=preds)
    manifest = json.loads((tiny["shards"] / "manifest.json").read_text())
    assert set(metrics) == {"caption", "category", "attributes", "attribute_qa", "freeform"}
    assert sum(m["n"] for m in metrics.values()) == manifest["splits"]["val"]["samples"] == len(preds)
    for m in metrics.values():
        assert math.isfinite(m["loss"]) and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    # the per-sample loss is the model's own mean cross-entropy over the answer (+ EOS) tokens
    loaded = load_model(tiny["model"])
    gen = Generator(loaded)
    record, item = read_samples(tiny["shards"], "val", None, 1)[0]
    p = gen.prompt(record["conversation"][:-1], record["images"], item["reference"])
    ids = torch.tensor([p.input_ids + p.answer_ids])
    labels = torch.tensor([[-100] * len(p) + p.answer_ids])
    with torch.no_grad():
        out = loaded.model(ids, labels=labels, pixel_values=gen._pixels([p], False),
                           image_slots=torch.tensor([[0, p.image_starts[0]]]))
    first = next(x for x in preds if x["key"] == item["key"])
    assert first["loss"] == pytest.approx(float(out.loss), abs=1e-5)
    # a token-weighted task mean: total NLL / total answer tokens
    task_rows = [x for x in preds if x["task"] == item["task"]]
    assert min(x["loss"] for x in task_rows) <= metrics[item["task"]]["loss"] <= max(x["loss"] for x in task_rows)
    baseline = majority_baseline(tiny["shards"])
    table = format_table(metrics, baseline)
    assert "category leaf_acc" in table and "majority" in table and "attributes colour f1" in table
    assert metrics["attributes"]["synonyms"] == baseline["attributes"]["synonyms"] == "fashion-products"
    assert set(metrics["attributes"]) == {"n", "micro", "macro", "per_attribute", "synonyms", "loss", "perplexity"}
    path = write_results(tmp_path / "metrics.json", {"metrics": metrics, "baseline": baseline}, preds)
    assert path == tmp_path / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(preds) and {"key", "task", "question", "reference", "prediction", "loss"} <= set(rows[0])


def test_blank_images_feed_constant_grey_pixels(tiny, monkeypatch):
    loaded = load_model(tiny["model"])
    seen: list[torch.Tensor] = []
    forward = loaded.model.forward

    def spy(*args, **kwargs):
        if kwargs.get("pixel_values") is not None:
            seen.append(kwargs["pixel_values"].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", spy)
    real = evaluate(loaded, tiny["shards"], tasks=["category"], limit=4, batch_size=4, max_new_tokens=2)
    real_pixels, seen[:] = list(seen), []
    blank = evaluate(loaded, tiny["shards"], tasks=["category"], limit=4, batch_size=4, max_new_tokens=2,
                     blank_images=True)
    cfg: ImageConfig = loaded.image_config
    grey = torch.tensor([(GREY - 255 * m) / (255 * s) for m, s in zip(cfg.mean, cfg.std)]).view(1, 3, 1, 1)
    assert seen and all(p.shape[0] == 4 for p in seen)
    for pixels in seen:
        assert torch.allclose(pixels, grey.expand_as(pixels), atol=1e-5)
    for pixels in real_pixels:
        assert pixels.std(dim=(2, 3)).min() > 0.05  # real photos are not constant
    assert blank["category"]["loss"] != pytest.approx(real["category"]["loss"], abs=1e-6)


def test_exported_image_processor_is_used(tiny, tmp_path):
    import shutil

    model = tmp_path / "exported"
    shutil.copytree(tiny["model"], model)
    (model / "image_processor.json").write_text(json.dumps(
        {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": "pad", "augment": True,
         "hflip": False}))
    cfg = load_model(model).image_config
    assert (cfg.size, cfg.mean, cfg.std, cfg.resize, cfg.augment) == (32, (0.5,) * 3, (0.25,) * 3, "pad", False)
    assert load_model(tiny["model"]).image_config == ImageConfig(size=32)  # stage dirs: the tower's size


def test_table_rows_spell_out_micro_macro_and_per_attribute_scores():
    attributes = {"n": 2, "micro": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3},
                  "macro": {"precision": 0.5, "recall": 0.5, "f1": 0.5},
                  "per_attribute": {"colour": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}},
                  "synonyms": "fashion-products"}
    qa = {"n": 3, "accuracy": 2 / 3, "per_attribute": {"colour": 0.5, "usage": 1.0},
          "per_attribute_n": {"colour": 2, "usage": 1}, "synonyms": "none"}
    assert flat_metrics({"attributes": attributes, "attribute_qa": qa}) == {
        "attributes n": 2, "attributes micro precision": 0.5, "attributes micro recall": 0.25,
        "attributes micro f1": 1 / 3, "attributes macro precision": 0.5, "attributes macro recall": 0.5,
        "attributes macro f1": 0.5, "attributes colour precision": 1.0, "attributes colour recall": 0.5,
        "attributes colour f1": 2 / 3, "attributes colour support": 2, "attributes synonyms": "fashion-products",
        "attribute_qa n": 3, "attribute_qa accuracy": 2 / 3, "attribute_qa colour acc": 0.5,
        "attribute_qa usage acc": 1.0, "attribute_qa colour n": 2, "attribute_qa usage n": 1,
        "attribute_qa synonyms": "none"}
    lines = format_table({"attributes": attributes}, {"attributes": {**attributes, "synonyms": "none"}}).splitlines()
    assert lines[0].split() == ["metric", "model", "majority"]
    assert lines[5].split() == ["attributes", "micro", "f1", "0.3333", "0.3333"]
    assert lines[11].split() == ["attributes", "colour", "f1", "0.6667", "0.6667"]
    assert lines[12].split() == ["attributes", "colour", "support", "2", "2"]
    # the columns widen to the longest cell
    assert lines[-1] == "attributes synonyms" + " " * 10 + "fashion-products" + " " * 14 + "none"
