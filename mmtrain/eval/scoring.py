"""Per-task scores over a split: what each product task's answers are judged by (see docs/eval.md).

An *item* is one scored sample: `{"key", "task", "question", "reference", "prediction"}` (plus anything else). The
scorers only read those fields, so the model's predictions, the majority baseline's and hand-written ones in tests
go through the same code.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from functools import partial
from typing import Any, Callable, Iterable, Sequence

from mmtrain.data.shards.product_tasks import ATTRIBUTE_QA_PROMPTS, CATEGORY_PROMPTS, FREEFORM_QA, IMAGE_MARK
from mmtrain.eval.metrics import (NO_SYNONYMS, Synonyms, category_parts, corpus_bleu, exact_match, mean, normalize,
                                  parse_attributes, prf, rouge_l, token_f1)

_PHRASING = re.compile(r"_(?:img|txt)\d+_(?P<phrasing>[^_]+)(?:_[0-9a-f]{8})?$")
_ATTR_QA_PATTERNS = [re.compile("^" + re.escape(p).replace(re.escape("{name}"), "(?P<name>.+?)") + "$")
                     for p in ATTRIBUTE_QA_PROMPTS]
_CATEGORY_KIND = {normalize(p): kind for p, kind in CATEGORY_PROMPTS}
_FREEFORM_PATTERNS = [re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+?", re.escape(q)) + "$") for _, q, _ in FREEFORM_QA]


def question_line(question: str) -> str:
    """The instruction itself: the last non-empty line of the user turn, image marks removed (text-only samples put
    "Product: ..." lines before it)."""
    lines = [ln.strip() for ln in question.replace(IMAGE_MARK, "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def key_phrasing(key: str) -> str | None:
    """The phrasing part of a catalog sample key `<pid>_<task>_img<n>_<phrasing>` (None when it does not parse)."""
    match = _PHRASING.search(key)
    return match.group("phrasing") if match else None


def category_kind(question: str, reference: str) -> str:
    """"path" or "leaf": what the question asked for, from its phrasing; a phrasing we do not know falls back to
    the reference's shape (a path contains " > ")."""
    kind = _CATEGORY_KIND.get(normalize(question_line(question)))
    if kind:
        return kind
    return "path" if len(category_parts(reference)) > 1 else "leaf"


def attribute_name(key: str, question: str) -> str:
    """The attribute an attribute-QA question is about: from the question text (the known phrasings), else from
    the key's `<name>-<idx>` phrasing part, else "?"."""
    line = question_line(question)
    for pattern in _ATTR_QA_PATTERNS:
        match = pattern.match(line)
        if match:
            return normalize(match.group("name"))
    match = re.search(r"_attribute_qa_(?:img|txt)\d+_(?P<name>.+)-\d+(?:_[0-9a-f]{8})?$", key)
    return normalize(match.group("name")) if match else "?"


def freeform_question(key: str, question: str) -> str:
    """Which free-form question template was asked (index into FREEFORM_QA), for the baseline's grouping."""
    line = question_line(question)
    for i, pattern in enumerate(_FREEFORM_PATTERNS):
        if pattern.match(line):
            return str(i)
    return key_phrasing(key) or "?"


def score_caption(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    preds, refs = [it["prediction"] for it in items], [it["reference"] for it in items]
    return {"n": len(items), "bleu": corpus_bleu(preds, refs) if items else None,
            "rouge_l": mean([rouge_l(p, r) for p, r in zip(preds, refs)]),
            "exact": mean([float(exact_match(p, r)) for p, r in zip(preds, refs)])}


def score_category(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    leaf, path, master = [], [], []
    for it in items:
        pred, ref = category_parts(it["prediction"]), category_parts(it["reference"])
        leaf.append(float(bool(pred) and bool(ref) and pred[-1] == ref[-1]))
        if len(ref) > 1:  # path accuracy only where the reference is a full path
            path.append(float(pred == ref))
            master.append(float(bool(pred) and pred[0] == ref[0]))
    return {"n": len(items), "leaf_acc": mean(leaf), "path_n": len(path), "path_acc": mean(path),
            "master_acc": mean(master)}


def _scores(correct: int, predicted: int, reference: int) -> dict[str, float]:
    precision, recall, f1 = prf(correct, predicted, reference)
    return {"precision": precision, "recall": recall, "f1": f1}


def score_attributes(items: Sequence[dict[str, Any]], synonyms: Synonyms = NO_SYNONYMS) -> dict[str, Any]:
    """Per attribute: precision = correct / predicted values of it, recall = correct / reference values of it, F1.
    `micro` pools the counts of every attribute (a predicted attribute no reference has counts as wrong), `macro`
    averages per-attribute scores over the attributes with references (the rows of `per_attribute`)."""
    correct: Counter = Counter()
    predicted: Counter = Counter()
    support: Counter = Counter()
    for it in items:
        pred, ref = parse_attributes(it["prediction"]), parse_attributes(it["reference"])
        predicted.update(pred.keys())
        support.update(ref.keys())
        correct.update(k for k, v in pred.items() if k in ref and synonyms.same(k, v, ref[k]))
    per = {k: {**_scores(correct[k], predicted[k], support[k]), "support": support[k]} for k in sorted(support)}
    micro = _scores(sum(correct.values()), sum(predicted.values()), sum(support.values()))
    if not items:
        micro = dict.fromkeys(micro)
    macro = {name: mean([row[name] for row in per.values()]) for name in ("precision", "recall", "f1")}
    return {"n": len(items), "micro": micro, "macro": macro, "per_attribute": per, "synonyms": synonyms.source}


def score_attribute_qa(items: Sequence[dict[str, Any]], synonyms: Synonyms = NO_SYNONYMS) -> dict[str, Any]:
    """Accuracy of the answered value (compared as attribute values, with the attribute's synonyms), overall and per
    attribute (`per_attribute_n`: how many questions each accuracy rests on)."""
    per: dict[str, list[float]] = defaultdict(list)
    overall = []
    for it in items:
        name = attribute_name(it["key"], it["question"])
        hit = float(synonyms.same(name, it["prediction"], it["reference"]))
        overall.append(hit)
        per[name].append(hit)
    return {"n": len(items), "accuracy": mean(overall), "per_attribute": {k: mean(v) for k, v in sorted(per.items())},
            "per_attribute_n": {k: len(v) for k, v in sorted(per.items())}, "synonyms": synonyms.source}


def score_freeform(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(items), "token_f1": mean([token_f1(it["prediction"], it["reference"]) for it in items]),
            "exact": mean([float(exact_match(it["prediction"], it["reference"])) for it in items])}


SCORERS: dict[str, Callable[[Sequence[dict[str, Any]]], dict[str, Any]]] = {
    "caption": score_caption, "category": score_category, "attributes": score_attributes,
    "attribute_qa": score_attribute_qa, "freeform": score_freeform,
}


def score_items(items: Iterable[dict[str, Any]], tasks: Sequence[str] | None = None,
                synonyms: Synonyms = NO_SYNONYMS) -> dict[str, dict[str, Any]]:
    """{task: metrics} for every task with items (or every task in `tasks`, n = 0 where none); attribute values are
    compared with `synonyms` (the catalog spec's, see `Synonyms.from_spec`)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        by_task[it["task"]].append(it)
    scorers = {**SCORERS, "attributes": partial(score_attributes, synonyms=synonyms),
               "attribute_qa": partial(score_attribute_qa, synonyms=synonyms)}
    names = list(tasks) if tasks is not None else [t for t in SCORERS if t in by_task]
    return {t: scorers[t](by_task.get(t, [])) for t in names if t in scorers}
