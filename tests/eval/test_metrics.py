"""String metrics against values worked out by hand (docs/eval.md states each convention)."""

from __future__ import annotations

import math

import pytest

from mmtrain.eval.metrics import (corpus_bleu, lcs_length, normalize, parse_attributes, rouge_l, squad_tokens,
                                  token_f1)

CAT = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_identical_strings_score_one():
    assert corpus_bleu([CAT], [CAT]) == pytest.approx(1.0)
    assert rouge_l(CAT, CAT) == 1.0
    assert token_f1(CAT, CAT) == 1.0


def test_bleu4_worked_example_with_add_one_smoothing():
    # p1 = 5/6 (the×2, cat, on, mat); p2 = (3+1)/(5+1); p3 = (1+1)/(4+1); p4 = (0+1)/(3+1); equal lengths: BP = 1
    assert corpus_bleu([CAT], [REF]) == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-12)
    assert corpus_bleu([CAT], [REF]) == pytest.approx((1 / 18) ** 0.25, abs=1e-12)


def test_bleu4_brevity_penalty():
    # every n-gram of "the cat" matches (orders 3-4 have none: (0+1)/(0+1)); BP = exp(1 - 6/2)
    assert corpus_bleu(["the cat"], [CAT]) == pytest.approx(math.exp(-2), abs=1e-12)
    # longer than the reference: no penalty, precision only
    assert corpus_bleu([CAT + " today"], [CAT]) < 1.0


def test_bleu4_is_corpus_level():
    # counts summed over both pairs: p1 = 10/11, p2 = (3+4+1)/(5+4+1), p3 = (1+3+1)/(4+3+1), p4 = (0+2+1)/(3+2+1)
    value = corpus_bleu([CAT, "a b c d e"], [REF, "a b c d e"])
    assert value == pytest.approx((10 / 11 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25, abs=1e-12)
    assert value == pytest.approx((5 / 22) ** 0.25, abs=1e-12)


def test_bleu_edge_cases():
    assert corpus_bleu([], []) == 0.0
    assert corpus_bleu([""], [CAT]) == 0.0
    assert corpus_bleu(["dog"], [CAT]) == 0.0
    assert corpus_bleu(["The CAT, sat."], ["the cat , sat ."]) == pytest.approx(1.0)  # punctuation is a token
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


def test_rouge_l_worked_examples():
    assert lcs_length(CAT.split(), REF.split()) == 5  # the cat on the mat
    assert rouge_l(CAT, REF) == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert lcs_length("a b c d".split(), "a c e".split()) == 2
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0
    assert rouge_l("Navy-Blue shirt!", "navy blue SHIRT") == 1.0  # non-alphanumerics split tokens


def test_token_f1_squad_normalization():
    assert squad_tokens("The shirt, an item.") == ["shirt", "item"]
    assert token_f1("It is meant for Casual use.", "It is meant for Formal use.") == pytest.approx(5 / 6)
    assert token_f1("the", "") == 1.0  # both empty after dropping articles
    assert token_f1("black", "") == 0.0


def test_token_f1_exact_value():
    # pred tokens [this, item, is, black, and, white] (6), ref [this, item, is, black] (4): common 4
    p, r = 4 / 6, 4 / 4
    assert token_f1("This item is black and white", "This item is black") == pytest.approx(2 * p * r / (p + r))


def test_normalize_and_attribute_parsing():
    assert normalize("  Navy   Blue. ") == "navy blue"
    got = parse_attributes("Gender: Men\ncolour:  Navy Blue\nno colon here\ncolour: Red\n: empty key")
    assert got == {"gender": "men", "colour": "navy blue"}  # first value of a repeated key wins
