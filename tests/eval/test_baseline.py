"""The majority baseline on a hand-built shard set: the answers it picks and its scores, worked out by hand."""

from __future__ import annotations

import pytest

from eval_helpers import build_text_shards, qa
from mmtrain.eval.baseline import MajorityBaseline, majority_baseline, read_items

PATH_Q = "What category does this product belong to?"
LEAF_Q = "What type of product is this?"
COLOUR_Q = "What is the colour of this product?"
GENDER_Q = "Tell me the gender of this product."
WHO_Q = "Who is this product made for?"

TRAIN = [
    qa("p1_category_img0_0", "category", PATH_Q, "A > B > C"),
    qa("p2_category_img0_0", "category", PATH_Q, "A > B > C"),
    qa("p3_category_img0_0", "category", PATH_Q, "A > B > D"),
    qa("p4_category_img0_4", "category", LEAF_Q, "D"),
    qa("p5_category_img0_4", "category", LEAF_Q, "D"),
    qa("p6_category_img0_4", "category", LEAF_Q, "C"),
    qa("p1_attribute_qa_img0_colour-0", "attribute_qa", COLOUR_Q, "Black"),
    qa("p2_attribute_qa_img0_colour-0", "attribute_qa", COLOUR_Q, "Black"),
    qa("p3_attribute_qa_img0_colour-0", "attribute_qa", COLOUR_Q, "Blue"),
    qa("p4_attribute_qa_img0_gender-2", "attribute_qa", GENDER_Q, "Men"),
    qa("p5_attribute_qa_img0_gender-2", "attribute_qa", GENDER_Q, "Women"),
    qa("p6_attribute_qa_img0_gender-2", "attribute_qa", GENDER_Q, "Women"),
    qa("p1_attributes_img0_0", "attributes", "List the attributes of this product.", "gender: Men\ncolour: Black"),
    qa("p2_attributes_img0_0", "attributes", "List the attributes of this product.", "gender: Men\ncolour: Black"),
    qa("p3_attributes_img0_0", "attributes", "List the attributes of this product.",
       "gender: Women\ncolour: Blue\nyear: 2012"),
    qa("p1_caption_img0_0", "caption", "Describe this product.", "Blue shirt"),
    qa("p2_caption_img0_0", "caption", "Describe this product.", "Blue shirt"),
    qa("p3_caption_img0_0", "caption", "Describe this product.", "Red shirt"),
    qa("p1_freeform_img0_4", "freeform", WHO_Q, "It is made for Men."),
    qa("p2_freeform_img0_4", "freeform", WHO_Q, "It is made for Women."),
    qa("p3_freeform_img0_4", "freeform", WHO_Q, "It is made for Women."),
]
VAL = [
    qa("v1_category_img0_0", "category", PATH_Q, "A > B > C"),  # baseline "A > B > C": path, leaf, master right
    qa("v2_category_img0_0", "category", PATH_Q, "E > B > D"),  # "A > B > C": all wrong
    qa("v3_category_img0_4", "category", LEAF_Q, "D"),  # baseline "D": right
    qa("v1_attribute_qa_img0_colour-0", "attribute_qa", COLOUR_Q, "Blue"),  # "Black": wrong
    qa("v2_attribute_qa_img0_gender-2", "attribute_qa", GENDER_Q, "Women"),  # "Women": right
    qa("v3_attribute_qa_img0_season-0", "attribute_qa", "What is the season of this product?", "Summer"),
    qa("v1_attributes_img0_0", "attributes", "List the attributes of this product.",
       "gender: Men\ncolour: Red\nseason: Fall"),  # "gender: Men\ncolour: Black": 1 of 2 predicted right, of 3
    qa("v1_caption_img0_0", "caption", "Describe this product.", "Blue shirt"),
    qa("v1_freeform_img0_4", "freeform", WHO_Q, "It is made for Men."),  # "... Women.": 4 of 5 tokens
]


@pytest.fixture(scope="module")
def hand_shards(tmp_path_factory):
    return build_text_shards(tmp_path_factory.mktemp("hand") / "shards", TRAIN, VAL)


def test_hand_built_splits_are_exact(hand_shards):
    assert len(read_items(hand_shards, "train")) == len(TRAIN)
    assert {it["key"] for it in read_items(hand_shards, "val")} == {s.key for s in VAL}


def test_majority_answers_per_group(hand_shards):
    base = MajorityBaseline(read_items(hand_shards, "train"))
    ask = lambda key, task, q: base.answer({"key": key, "task": task, "question": q, "reference": ""})  # noqa: E731
    assert ask("x_category_img0_0", "category", PATH_Q) == "A > B > C"
    assert ask("x_category_img0_4", "category", LEAF_Q) == "D"
    assert ask("x_attribute_qa_img0_colour-0", "attribute_qa", COLOUR_Q) == "Black"
    assert ask("x_attribute_qa_img0_gender-2", "attribute_qa", GENDER_Q) == "Women"
    # an attribute never asked in training: the task's most frequent answer overall (Black 2, Women 2: first seen)
    assert ask("x_attribute_qa_img0_season-0", "attribute_qa", "What is the season of this product?") == "Black"
    assert ask("x_attributes_img0_0", "attributes", "List") == "gender: Men\ncolour: Black"  # year in 1 of 3: dropped
    assert ask("x_caption_img0_0", "caption", "Describe this product.") == "Blue shirt"
    assert ask("x_freeform_img0_4", "freeform", WHO_Q) == "It is made for Women."


def test_majority_baseline_scores(hand_shards):
    preds: list = []
    got = majority_baseline(hand_shards, predictions=preds)
    assert got["category"] == {"n": 3, "leaf_acc": 2 / 3, "path_n": 2, "path_acc": 0.5, "master_acc": 0.5}
    assert got["attribute_qa"]["accuracy"] == pytest.approx(1 / 3)
    assert got["attribute_qa"]["per_attribute"] == {"colour": 0.0, "gender": 1.0, "season": 0.0}
    # "gender: Men\ncolour: Black" for "gender: Men\ncolour: Red\nseason: Fall": gender right, colour wrong, season
    # not predicted; micro 1 of 2 predicted, 1 of 3 reference values; macro over gender, colour, season
    attributes = got["attributes"]
    assert attributes["per_attribute"] == {
        "colour": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "gender": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
        "season": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}}
    assert attributes["micro"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5})
    assert attributes["macro"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert attributes["synonyms"] == got["attribute_qa"]["synonyms"] == "none"  # a hand-built set: no catalog spec
    # "Blue shirt" = "Blue shirt", but 2 tokens have no 3-gram: sacrebleu's corpus BLEU is 0; ROUGE-L is 1
    assert got["caption"]["bleu"] == 0.0 and got["caption"]["rouge_l"] == 1.0
    # "it is made for women" vs "it is made for men": 4 of 5 tokens each way
    assert got["freeform"]["token_f1"] == pytest.approx(0.8)
    assert len(preds) == len(VAL) and all("prediction" in p for p in preds)
    assert majority_baseline(hand_shards, tasks=["category"], limit=2)["category"]["n"] == 2
