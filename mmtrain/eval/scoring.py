"""Per-task scores over a split: what each product task's answers are judged by (see docs/eval.md).

An *item* is one scored sample: `{"key", "task", "question", "reference", "prediction"}` (plus anything else). The
scorers only read those fields, so the model's predictions, the majority baseline's and hand-written ones in tests
go through the same code.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

from mmtrain.data.shards.product_tasks import ATTRIBUTE_QA_PROMPTS, CATEGORY_PROMPTS, FREEFORM_QA, IMAGE_MARK
from mmtrain.eval.metrics import (category_parts, corpus_bleu, exact_match, mean, normalize, parse_attributes, rouge_l,
                                  token_f1)

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
    return {"n": len(items), "bleu4": corpus_bleu(preds, refs) if items else None,
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


def score_attributes(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tp = n_pred = n_ref = 0
    per_key: dict[str, list[float]] = defaultdict(list)
    for it in items:
        pred, ref = parse_attributes(it["prediction"]), parse_attributes(it["reference"])
        tp += sum(1 for k, v in pred.items() if ref.get(k) == v)
        n_pred, n_ref = n_pred + len(pred), n_ref + len(ref)
        for k, v in ref.items():
            per_key[k].append(float(pred.get(k) == v))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(items), "precision": precision, "recall": recall, "f1": f1,
            "per_key": {k: mean(v) for k, v in sorted(per_key.items())}}


def score_attribute_qa(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, list[float]] = defaultdict(list)
    overall = []
    for it in items:
        hit = float(exact_match(it["prediction"], it["reference"]))
        overall.append(hit)
        per[attribute_name(it["key"], it["question"])].append(hit)
    return {"n": len(items), "accuracy": mean(overall), "per_attribute": {k: mean(v) for k, v in sorted(per.items())}}


def score_freeform(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(items), "token_f1": mean([token_f1(it["prediction"], it["reference"]) for it in items]),
            "exact": mean([float(exact_match(it["prediction"], it["reference"])) for it in items])}


SCORERS: dict[str, Callable[[Sequence[dict[str, Any]]], dict[str, Any]]] = {
    "caption": score_caption, "category": score_category, "attributes": score_attributes,
    "attribute_qa": score_attribute_qa, "freeform": score_freeform,
}


def score_items(items: Iterable[dict[str, Any]], tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """{task: metrics} for every task with items (or every task in `tasks`, n = 0 where none)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        by_task[it["task"]].append(it)
    names = list(tasks) if tasks is not None else [t for t in SCORERS if t in by_task]
    return {t: SCORERS[t](by_task.get(t, [])) for t in names if t in SCORERS}
