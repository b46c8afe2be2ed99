"""The five product tasks: exact answers from catalog fields, ≥ 8 phrasings, seeded and order-independent."""

from __future__ import annotations

from pathlib import Path

from mmtrain.data.shards.catalog import Product
from mmtrain.data.shards.product_tasks import (ATTRIBUTE_PROMPTS, ATTRIBUTE_QA_PROMPTS, CAPTION_PROMPTS, CATEGORY_PROMPTS,
                                FREEFORM_QA, TASKS, Draws, product_samples, safe_key_part)

SHIRT = Product("15970", "Turtle Check Men Navy Blue Shirt", "", ("Apparel", "Topwear", "Shirts"),
                {"gender": "Men", "colour": "Navy Blue", "season": "Fall", "year": "2011", "usage": "Casual"},
                (Path("15970.jpg"),), 1)


def test_at_least_eight_phrasings_per_task() -> None:
    for prompts in (CAPTION_PROMPTS, CATEGORY_PROMPTS, ATTRIBUTE_PROMPTS, ATTRIBUTE_QA_PROMPTS, FREEFORM_QA):
        assert len(set(prompts)) >= 8


def test_answers_come_from_the_catalog_fields() -> None:
    by_task = {s.task: s for s in product_samples(SHIRT, seed=0)}
    assert sorted(by_task) == sorted(TASKS)
    assert by_task["caption"].conversation[1]["content"] == SHIRT.title
    assert by_task["category"].conversation[1]["content"] in ("Apparel > Topwear > Shirts", "Shirts")
    assert by_task["attributes"].conversation[1]["content"] == (
        "gender: Men\ncolour: Navy Blue\nseason: Fall\nyear: 2011\nusage: Casual")
    qa = by_task["attribute_qa"]
    name = next(k for k in SHIRT.attributes if f" {k} " in qa.conversation[0]["content"] + " ")
    assert qa.conversation[1]["content"] == SHIRT.attributes[name]
    for s in by_task.values():
        assert s.conversation[0]["content"].startswith("<image>\n") and s.num_images == 1
        assert s.product_id == "15970" and s.key.startswith("15970_" + s.task)


def test_same_seed_same_samples_other_seed_other_phrasings() -> None:
    a = product_samples(SHIRT, per_task=4, seed=0)
    assert a == product_samples(SHIRT, per_task=4, seed=0)
    drawn = {seed: [s.conversation[0]["content"] for s in product_samples(SHIRT, per_task=4, seed=seed)]
             for seed in range(6)}
    assert len({tuple(v) for v in drawn.values()}) == 6
    assert len({s.key for s in a}) == len(a) == 20


def test_text_only_variant_carries_the_product_text_instead_of_an_image() -> None:
    samples = product_samples(SHIRT, tasks=["caption", "category"], text_only=True)
    caption, category = samples
    assert caption.num_images == 0 and "<image>" not in caption.conversation[0]["content"]
    assert "colour: Navy Blue" in caption.conversation[0]["content"]
    assert caption.conversation[1]["content"] == SHIRT.title
    assert category.conversation[0]["content"].startswith(f"Product: {SHIRT.title}\n")
    assert "_txt0_" in caption.key and "_img0_" in product_samples(SHIRT, tasks=["caption"])[0].key


def test_products_without_fields_skip_only_those_tasks() -> None:
    bare = Product("x/1.2", "Plain mug", "", (), {}, (Path("a.jpg"), Path("b.jpg")), 3)
    samples = product_samples(bare)
    assert [s.task for s in samples] == ["caption"]
    assert samples[0].conversation[0]["content"].startswith("<image>\n<image>\n") and samples[0].num_images == 2
    assert "." not in samples[0].key and "/" not in samples[0].key
    assert safe_key_part("x/1.2") != safe_key_part("x_1_2")


def test_every_attribute_asks_each_attribute_once_and_leaves_the_other_tasks_alone() -> None:
    every = product_samples(SHIRT, per_task=3, seed=0, every_attribute=True)
    drawn = product_samples(SHIRT, per_task=3, seed=0)
    qa = [s for s in every if s.task == "attribute_qa"]
    assert [s.conversation[1]["content"] for s in qa] == ["Navy Blue", "Men", "Fall", "Casual", "2011"]  # sorted names
    for s, name in zip(qa, ("colour", "gender", "season", "usage", "year")):
        assert f" {name}" in s.conversation[0]["content"] and f"_{name}-" in s.key
    assert len({s.key for s in every}) == len(every) == 4 * 3 + 5  # per_task does not apply to attribute QA
    assert [s for s in every if s.task != "attribute_qa"] == [s for s in drawn if s.task != "attribute_qa"]
    assert product_samples(Product("b", "Mug", "", (), {}, (Path("a.jpg"),), 1), every_attribute=True)[0].task \
        == "caption"  # no attributes: no attribute QA, as without the option


def test_attribute_weights_skew_the_drawn_attribute_and_leave_the_other_tasks_alone() -> None:
    from collections import Counter

    draws = Draws(0, "p", "t")
    picks = Counter(draws.weighted_choice("ab", [3.0, 1.0]) for _ in range(4000))
    assert abs(picks["a"] / 4000 - 0.75) < 0.03  # 0.75 ± 4.4 standard errors
    assert {Draws(0, "p", "t").weighted_choice("ab", [1.0, 1e-12]) for _ in range(50)} == {"a"}

    asked: Counter = Counter()
    for pid in range(400):
        product = Product(str(pid), SHIRT.title, "", SHIRT.category, SHIRT.attributes, SHIRT.image_paths, 1)
        weighted = product_samples(product, per_task=2, seed=0, attribute_weights={"colour": 4})
        plain = product_samples(product, per_task=2, seed=0)
        asked.update(s.key.split("_attribute_qa_")[1].split("_", 1)[1].split("-")[0]
                     for s in weighted if s.task == "attribute_qa")
        assert [s for s in weighted if s.task != "attribute_qa"] == [s for s in plain if s.task != "attribute_qa"]
        for s in weighted:
            if s.task == "attribute_qa":  # the answer is still the asked attribute's value
                name = s.key.split("_attribute_qa_")[1].split("_", 1)[1].split("-")[0]
                assert s.conversation[1]["content"] == SHIRT.attributes[name] and name in s.conversation[0]["content"]
    assert sum(asked.values()) == 800
    assert abs(asked["colour"] / 800 - 0.5) < 0.06  # weight 4 against four names of weight 1: half the questions
    assert all(abs(asked[n] / 800 - 0.125) < 0.05 for n in ("gender", "season", "usage", "year"))
    # no weights (None or {}) draws exactly as before
    assert product_samples(SHIRT, per_task=3, attribute_weights={}) == product_samples(SHIRT, per_task=3)
    # a weight for a name the product lacks changes nothing about which of its own names it can ask
    only = product_samples(SHIRT, tasks=("attribute_qa",), per_task=20, attribute_weights={"material": 100})
    assert {s.conversation[1]["content"] for s in only} <= set(SHIRT.attributes.values())
