"""String metrics: normalization, exact match, corpus BLEU (sacrebleu), ROUGE-L (rouge-score), token F1, attribute
values compared up to case, spacing, trailing punctuation and the catalog's synonyms.

Settings, so the numbers can be reproduced with the libraries themselves (docs/eval.md):
- **BLEU** (`corpus_bleu`): sacrebleu's corpus BLEU with every default — 13a tokenizer, case kept, exp smoothing, one
  reference per candidate, signature `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp` — divided by 100, so it is on the
  0–1 scale of every other number in the report.
- **ROUGE-L** (`rouge_l`): rouge-score's `RougeScorer(["rougeL"], use_stemmer=False)` F-measure of one pair (its own
  tokenizer: lower-cased `[a-z0-9]` runs); the task score is the mean over samples.
- **token F1** (`token_f1`): SQuAD v1.1 — lower-case, drop punctuation and the articles a/an/the, split on
  whitespace, F1 of the bag-of-tokens overlap; both empty = 1, one empty = 0.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from typing import Any, Mapping, Sequence

from sacrebleu.metrics import BLEU

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_TRAILING = ".,;:!? "
ROUGE_STEMMER = False


def normalize(text: str) -> str:
    """Case- and space-normalized text for exact match: lower-cased, whitespace collapsed, a trailing full stop and
    surrounding spaces dropped ("Navy  Blue." == "navy blue")."""
    return " ".join(text.lower().split()).rstrip(". ").strip()


def normalize_value(text: str) -> str:
    """An attribute value as compared: lower-cased, whitespace collapsed, trailing `.,;:!?` dropped
    ("Navy  Blue!" == "navy blue")."""
    return " ".join(text.lower().split()).rstrip(_TRAILING)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def corpus_bleu(candidates: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU with its defaults (see the module docstring), on a 0–1 scale. Empty corpus → 0."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        return 0.0
    return BLEU().corpus_score(list(candidates), [list(references)]).score / 100


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # lazy: rouge_score imports nltk (~2 s), which only caption scoring needs
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=ROUGE_STEMMER)


def rouge_l(candidate: str, reference: str) -> float:
    """rouge-score's ROUGE-L F-measure of one pair (no stemming); an empty side scores 0, as in the library."""
    return _rouge_scorer().score(reference, candidate)["rougeL"].fmeasure


def squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 of one pair."""
    p, r = squad_tokens(prediction), squad_tokens(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def category_parts(text: str) -> list[str]:
    """A category answer as normalized path elements ("Apparel > Topwear > Shirts" → 3 parts; a leaf → 1)."""
    return [normalize(p) for p in text.split(">") if normalize(p)]


def parse_attributes(text: str) -> dict[str, str]:
    """`key: value` lines → {normalized key: normalized value (`normalize_value`)}; lines without a colon are ignored,
    the first value of a repeated key wins (a model that repeats a key gets no second chance)."""
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = normalize(key)
        if sep and key and key not in pairs:
            pairs[key] = normalize_value(value)
    return pairs


class Synonyms:
    """Values that count as the same answer, per attribute: each member of an equivalence group stands for the
    group's first member. `source` names where they came from ("none" when there are none)."""

    def __init__(self, groups: Mapping[str, Sequence[Sequence[str]]] | None = None, source: str = "none"):
        self.source = source if groups else "none"
        self._canonical: dict[str, dict[str, str]] = {}
        for attribute, attribute_groups in (groups or {}).items():
            table = self._canonical.setdefault(normalize(attribute), {})
            for group in attribute_groups:
                first = normalize_value(str(group[0]))
                table.update({normalize_value(str(member)): first for member in group})

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "Synonyms":
        """The `synonyms` of a catalog spec as stored in a shard manifest (`source.spec`); none without one."""
        if not spec or not spec.get("synonyms"):
            return cls()
        return cls(spec["synonyms"], source=str(spec.get("name") or "catalog spec"))

    def canonical(self, attribute: str, value: str) -> str:
        """`value` normalized (`normalize_value`), then replaced by its group's first member for `attribute`."""
        value = normalize_value(value)
        return self._canonical.get(normalize(attribute), {}).get(value, value)

    def same(self, attribute: str, prediction: str, reference: str) -> bool:
        return self.canonical(attribute, prediction) == self.canonical(attribute, reference)


NO_SYNONYMS = Synonyms()


def prf(correct: int, predicted: int, reference: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts; a zero denominator gives 0 (scikit-learn's `zero_division=0`)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / reference if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
