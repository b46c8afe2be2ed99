"""Task scorers on hand-written predictions: every value below is worked out by hand."""

from __future__ import annotations

import pytest

from mmtrain.eval.metrics import corpus_bleu
from mmtrain.eval.scoring import attribute_name, category_kind, freeform_question, score_items


def item(task: str, reference: str, prediction: str, question: str = "<image>\nq", key: str = "1_x_img0_0") -> dict:
    return {"key": key, "task": task, "question": question, "reference": reference, "prediction": prediction}


def test_category_leaf_path_and_master_accuracy():
    items = [
        item("category", "Apparel > Topwear > Shirts", "apparel >  topwear > SHIRTS"),  # all right
        item("category", "Apparel > Topwear > Shirts", "Apparel > Bottomwear > Shirts"),  # leaf + master right
        item("category", "Shirts", "Apparel > Topwear > Shirts"),  # leaf question: leaf only
        item("category", "Watches", "Shirts"),
        item("category", "Footwear > Shoes > Casual Shoes", "Accessories > Watches"),
    ]
    got = score_items(items)["category"]
    assert got == {"n": 5, "leaf_acc": 3 / 5, "path_n": 3, "path_acc": 1 / 3, "master_acc": 2 / 3}


def test_attribute_extraction_micro_prf_and_per_key_accuracy():
    items = [
        item("attributes", "gender: Men\ncolour: Navy Blue\nseason: Fall",
             "gender: men\ncolour: Blue\nseason: Fall\nusage: Casual"),
        item("attributes", "gender: Women\ncolour: Black", "colour: black"),
        item("attributes", "year: 2012", "I don't know"),
    ]
    got = score_items(items)["attributes"]
    # true positives 2 + 1 + 0 = 3, predicted pairs 4 + 1 + 0 = 5, reference pairs 3 + 2 + 1 = 6
    assert got["precision"] == pytest.approx(3 / 5) and got["recall"] == pytest.approx(3 / 6)
    assert got["f1"] == pytest.approx(2 * 0.6 * 0.5 / 1.1)
    assert got["per_key"] == {"colour": 0.5, "gender": 0.5, "season": 1.0, "year": 0.0}


def test_attribute_qa_accuracy_per_attribute_from_question_or_key():
    items = [
        item("attribute_qa", "Navy Blue", "navy blue.", "<image>\nWhat is the colour of this product?",
             "15970_attribute_qa_img0_colour-0"),
        item("attribute_qa", "Black", "Blue", "<image>\nWhat colour is this item?", "2_attribute_qa_img0_colour-1"),
        item("attribute_qa", "Casual", "Casual", "an unknown phrasing", "3_attribute_qa_img0_usage-2"),
        item("attribute_qa", "Men", "Women", "Product: X\nWhat's this product's gender?",
             "4_attribute_qa_txt0_gender-5"),
    ]
    got = score_items(items)["attribute_qa"]
    assert got == {"n": 4, "accuracy": 0.5, "per_attribute": {"colour": 0.5, "gender": 0.0, "usage": 1.0}}


def test_question_parsing():
    question = "<image>\nIdentify the base colour of the item."
    assert attribute_name("k_attribute_qa_img0_whatever-3", question) == "base colour"
    assert attribute_name("odd_key", "no match") == "?"
    assert category_kind("<image>\nWhat type of product is this?", "A > B") == "leaf"  # the phrasing decides
    assert category_kind("<image>\nGive the full category path of this product, from the broadest to the most "
                         "specific.", "B") == "path"
    assert category_kind("something new", "A > B") == "path" and category_kind("something new", "B") == "leaf"
    assert freeform_question("k", "<image>\nCould I wear or use this for a Casual occasion?") == "1"
    assert freeform_question("k_freeform_img0_7", "not a known question") == "7"


def test_caption_and_freeform_scores():
    items = [item("caption", "Blue shirt for men", "Blue shirt for men"),
             item("caption", "the cat is on the mat", "the cat sat on the mat"),
             item("freeform", "It is meant for Formal use.", "It is meant for Casual use."),
             item("freeform", "It is made for Men.", "it is made for men")]
    got = score_items(items)
    assert got["caption"]["bleu4"] == pytest.approx(corpus_bleu(["Blue shirt for men", "the cat sat on the mat"],
                                                                ["Blue shirt for men", "the cat is on the mat"]))
    assert got["caption"]["rouge_l"] == pytest.approx((1 + 5 / 6) / 2)
    assert got["caption"]["exact"] == 0.5
    assert got["freeform"]["token_f1"] == pytest.approx((5 / 6 + 1) / 2)
    assert got["freeform"]["exact"] == 0.5


def test_tasks_without_items_report_n_zero():
    got = score_items([], ["category", "caption"])
    assert got["category"]["n"] == 0 and got["category"]["leaf_acc"] is None
    assert got["caption"]["bleu4"] is None
