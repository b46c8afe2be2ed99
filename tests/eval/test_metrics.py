"""String metrics against values worked out by hand (docs/eval.md states each convention), and against the libraries
called directly with the settings docs/eval.md gives."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from mmtrain.eval.metrics import (Synonyms, corpus_bleu, normalize, normalize_value, parse_attributes, prf, rouge_l,
                                  squad_tokens, token_f1)

CAT = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_identical_strings_score_one():
    assert corpus_bleu([CAT], [CAT]) == pytest.approx(1.0, abs=1e-12)
    assert rouge_l(CAT, CAT) == 1.0
    assert token_f1(CAT, CAT) == 1.0


def test_bleu_worked_example_with_exp_smoothing():
    # p1 = 5/6 (the×2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat), p4: no match of 3
    # 4-grams, so sacrebleu's exp smoothing gives 1 / (2 · 3); equal lengths: BP = 1
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert expected == pytest.approx((1 / 48) ** 0.25, abs=1e-15)
    assert corpus_bleu([CAT], [REF]) == pytest.approx(expected, abs=1e-12)
    assert corpus_bleu([CAT], [REF]) == pytest.approx(0.379918, abs=1e-6)


def test_bleu_brevity_penalty():
    # every n-gram of the candidate matches; c = 5 < r = 8: BP = exp(1 - 8/5)
    assert corpus_bleu(["a b c d e"], ["a b c d e f g h"]) == pytest.approx(math.exp(-0.6), abs=1e-12)
    # a longer candidate has no penalty: 6 of 7 unigrams … 3 of 4 4-grams match
    assert corpus_bleu([CAT + " today"], [CAT]) == pytest.approx((6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25, abs=1e-12)


def test_bleu_is_corpus_level():
    # counts summed over both pairs: p1 = (5+5)/(6+5), p2 = (3+4)/(5+4), p3 = (1+3)/(4+3), p4 = (0+2)/(3+2)
    value = corpus_bleu([CAT, "a b c d e"], [REF, "a b c d e"])
    assert value == pytest.approx((10 / 11 * 7 / 9 * 4 / 7 * 2 / 5) ** 0.25, abs=1e-12)
    assert value == pytest.approx((16 / 99) ** 0.25, abs=1e-12)


def test_bleu_13a_tokens_keep_case():
    # 13a splits "CAT," into CAT + ","; case is kept: The/the and CAT/cat differ. p1 = 3/5 (, sat .), p2 = 2/4,
    # p3 = 1/3 (", sat ."), p4 = 0 of 2 → exp smoothing 1 / (2 · 2)
    assert corpus_bleu(["The CAT, sat."], ["the cat , sat ."]) == pytest.approx((1 / 40) ** 0.25, abs=1e-12)


def test_bleu_edge_cases():
    assert corpus_bleu([], []) == 0.0
    assert corpus_bleu([""], [CAT]) == 0.0
    assert corpus_bleu(["dog"], [CAT]) == 0.0
    assert corpus_bleu(["blue shirt"], ["blue shirt"]) == 0.0  # no 3-grams in the corpus: sacrebleu scores 0
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


def test_bleu_equals_sacrebleu_defaults_over_100():
    cands = ["Blue shirt for men, casual.", "the cat sat on the mat", "Red watch"]
    refs = ["Blue shirt for men.", "the cat is on the mat", "Black analog watch for women"]
    assert corpus_bleu(cands, refs) == sacrebleu.corpus_bleu(cands, [refs]).score / 100
    assert corpus_bleu(cands, refs) == sacrebleu.BLEU(tokenize="13a", smooth_method="exp").corpus_score(
        cands, [refs]).score / 100


def test_rouge_l_worked_examples():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5: P = R = 5/6
    assert rouge_l(CAT, REF) == pytest.approx(5 / 6, abs=1e-12)
    # LCS("a b c d", "a c e") = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7, abs=1e-12)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 0.0 and rouge_l("", "a") == 0.0  # rouge-score: an empty side scores 0
    assert rouge_l("Navy-Blue shirt!", "navy blue SHIRT") == 1.0  # lower-cased [a-z0-9] runs
    assert rouge_l("shirts", "shirt") == 0.0  # no stemming


def test_rouge_l_equals_rouge_score_called_directly():
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("Blue shirt for men, casual.", "Blue shirt for men."), (CAT, REF), ("Red watch", "Black watch for women")]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == scorer.score(ref, pred)["rougeL"].fmeasure


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
    assert normalize_value("  Navy   Blue!?. ") == "navy blue"
    assert normalize_value("Off-White,") == "off-white" and normalize_value("U.S.A.") == "u.s.a"
    got = parse_attributes("Gender: Men\ncolour:  Navy Blue;\nno colon here\ncolour: Red\n: empty key")
    assert got == {"gender": "men", "colour": "navy blue"}  # first value of a repeated key wins


def test_synonyms_map_each_group_to_its_first_member():
    syn = Synonyms({"Colour": [["Grey", "Gray"], ["Off White", "Off-White"]], "season": [["Fall", "Autumn"]]},
                   source="spec")
    assert syn.source == "spec"
    assert syn.canonical("colour", " GRAY. ") == "grey" and syn.canonical("colour", "off-white") == "off white"
    assert syn.canonical("season", "gray") == "gray"  # groups are per attribute
    assert syn.same("colour", "Gray!", "grey") and not syn.same("colour", "Blue", "Navy Blue")
    assert Synonyms().source == "none" and Synonyms({}, source="spec").source == "none"
    assert Synonyms.from_spec(None).source == "none" and Synonyms.from_spec({"name": "x"}).source == "none"
    assert Synonyms.from_spec({"name": "x", "synonyms": {"season": [["Fall", "Autumn"]]}}).same("season", "fall",
                                                                                                "AUTUMN")


def test_prf_counts():
    assert prf(1, 5, 6) == pytest.approx((1 / 5, 1 / 6, 2 / 11))
    assert prf(0, 0, 3) == (0.0, 0.0, 0.0)  # nothing predicted: 0, as scikit-learn's zero_division=0
