"""Task scorers on hand-written predictions: every value below is worked out by hand."""

from __future__ import annotations

import pytest

from eval_helpers import SPEC
from mmtrain.data.shards.catalog import CatalogSpec
from mmtrain.eval.metrics import Synonyms
from mmtrain.eval.scoring import attribute_name, category_kind, freeform_question, score_items


@pytest.fixture(scope="module")
def fashion_synonyms() -> Synonyms:
    """The shipped catalog spec's synonyms, as the eval reads them from a manifest's `source.spec`."""
    return Synonyms.from_spec(CatalogSpec.from_yaml(SPEC).to_json())


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


ATTRIBUTE_ITEMS = [
    item("attributes", "gender: Men\ncolour: Navy Blue\nseason: Fall",
         "gender: men\ncolour: Blue\nseason: Autumn.\nusage: Casual"),
    item("attributes", "gender: Women\ncolour: Grey", "colour: gray!"),
    item("attributes", "year: 2012", "I don't know"),
]


def test_attribute_extraction_per_attribute_micro_and_macro():
    got = score_items(ATTRIBUTE_ITEMS)["attributes"]
    # per attribute (correct / predicted / reference): gender 1/1/2, colour 0/2/2, season 0/1/1, year 0/0/1;
    # usage 0/1/0 has no reference: no row, but a wrong prediction in the micro counts
    assert got["per_attribute"] == {
        "colour": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2},
        "gender": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
        "season": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "year": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    }
    # micro: 1 correct of 5 predicted and 6 reference values; macro: means over the 4 rows
    assert got["micro"] == pytest.approx({"precision": 1 / 5, "recall": 1 / 6, "f1": 2 / 11})
    assert got["macro"] == pytest.approx({"precision": 1 / 4, "recall": 1 / 8, "f1": 1 / 6})
    assert got["n"] == 3 and got["synonyms"] == "none"


def test_attribute_extraction_with_the_catalog_spec_synonyms(fashion_synonyms):
    got = score_items(ATTRIBUTE_ITEMS, synonyms=fashion_synonyms)["attributes"]
    # gray = grey (colour 1/2/2), autumn = fall (season 1/1/1); gender and year as without synonyms
    assert got["per_attribute"]["colour"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert got["per_attribute"]["season"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert got["micro"] == pytest.approx({"precision": 3 / 5, "recall": 1 / 2, "f1": 6 / 11})
    # macro P = (1 + 1/2 + 1 + 0)/4, R = (1/2 + 1/2 + 1 + 0)/4, F1 = (2/3 + 1/2 + 1 + 0)/4
    assert got["macro"] == pytest.approx({"precision": 5 / 8, "recall": 1 / 2, "f1": 13 / 24})
    assert got["synonyms"] == "fashion-products"


def test_attribute_qa_accuracy_per_attribute_from_question_or_key(fashion_synonyms):
    items = [
        item("attribute_qa", "Navy Blue", "navy blue.", "<image>\nWhat is the colour of this product?",
             "15970_attribute_qa_img0_colour-0"),
        item("attribute_qa", "Black", "Blue", "<image>\nWhat colour is this item?", "2_attribute_qa_img0_colour-1"),
        item("attribute_qa", "Casual", "Casual", "an unknown phrasing", "3_attribute_qa_img0_usage-2"),
        item("attribute_qa", "Men", "Women", "Product: X\nWhat's this product's gender?",
             "4_attribute_qa_txt0_gender-5"),
        item("attribute_qa", "Grey", "Gray!", "<image>\nWhat is the colour of this product?",
             "5_attribute_qa_img0_colour-0"),
    ]
    got = score_items(items)["attribute_qa"]
    assert got == {"n": 5, "accuracy": 2 / 5, "per_attribute": {"colour": 1 / 3, "gender": 0.0, "usage": 1.0},
                   "per_attribute_n": {"colour": 3, "gender": 1, "usage": 1}, "synonyms": "none"}
    got = score_items(items, synonyms=fashion_synonyms)["attribute_qa"]  # gray = grey for colour
    assert got["accuracy"] == 3 / 5 and got["per_attribute"]["colour"] == 2 / 3
    assert got["synonyms"] == "fashion-products"


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
    # corpus counts: p1 = (4+5)/(4+6), p2 = (3+3)/(3+5), p3 = (2+1)/(2+4), p4 = (1+0)/(1+3); BP = 1
    assert got["caption"]["bleu"] == pytest.approx((9 / 10 * 6 / 8 * 3 / 6 * 1 / 4) ** 0.25, abs=1e-12)
    assert got["caption"]["rouge_l"] == pytest.approx((1 + 5 / 6) / 2)
    assert got["caption"]["exact"] == 0.5
    assert got["freeform"]["token_f1"] == pytest.approx((5 / 6 + 1) / 2)
    assert got["freeform"]["exact"] == 0.5


def test_tasks_without_items_report_n_zero():
    got = score_items([], ["category", "caption", "attributes"])
    assert got["category"]["n"] == 0 and got["category"]["leaf_acc"] is None
    assert got["caption"]["bleu"] is None
    assert got["attributes"] == {"n": 0, "micro": {"precision": None, "recall": None, "f1": None},
                                 "macro": {"precision": None, "recall": None, "f1": None}, "per_attribute": {},
                                 "synonyms": "none"}
