"""String metrics written here (no new dependency): normalization, exact match, corpus BLEU-4, ROUGE-L, token F1.

Choices, so the numbers can be compared with other tools:
- **BLEU-4** (`corpus_bleu`): Papineni et al. 2002 at corpus level (clipped n-gram counts and lengths summed over the
  corpus, one reference per candidate, uniform weights 1/4, brevity penalty `exp(1 - r/c)` when `c < r`), with
  **add-one smoothing on orders 2-4** (Lin & Och 2004; NLTK's `SmoothingFunction().method2`): `p_n = (m_n + 1) /
  (c_n + 1)` for n >= 2, unigram precision unsmoothed. So a short corpus without any 4-gram match scores above 0.
  Tokens: lower-cased words and single punctuation marks (`\\w+|[^\\w\\s]`).
- **ROUGE-L** (`rouge_l`): longest common subsequence F-measure with beta = 1 (as Google's `rouge_score`), per sample,
  averaged over samples. Tokens: lower-cased runs of `[a-z0-9]` (rouge_score's default tokenizer).
- **token F1** (`token_f1`): SQuAD v1.1 — lower-case, drop punctuation and the articles a/an/the, split on
  whitespace, F1 of the bag-of-tokens overlap; both empty = 1, one empty = 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]")
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """Case- and space-normalized text for exact match: lower-cased, whitespace collapsed, a trailing full stop and
    surrounding spaces dropped ("Navy  Blue." == "navy blue")."""
    return " ".join(text.lower().split()).rstrip(". ").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def bleu_tokens(text: str) -> list[str]:
    return _BLEU_TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(candidates: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU-`max_n` with add-one smoothing for orders >= 2 (see the module docstring). Empty corpus → 0."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, ref in zip(candidates, references):
        c, r = bleu_tokens(cand), bleu_tokens(ref)
        cand_len, ref_len = cand_len + len(c), ref_len + len(r)
        for n in range(1, max_n + 1):
            cn, rn = _ngrams(c, n), _ngrams(r, n)
            matches[n - 1] += sum(min(count, rn[g]) for g, count in cn.items())
            totals[n - 1] += sum(cn.values())
    if cand_len == 0 or matches[0] == 0:
        return 0.0
    log_p = math.log(matches[0] / totals[0])
    for n in range(1, max_n):
        log_p += math.log((matches[n] + 1) / (totals[n] + 1))
    brevity = 1.0 if cand_len >= ref_len else math.exp(1.0 - ref_len / cand_len)
    return brevity * math.exp(log_p / max_n)


def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) of one pair; both empty → 1, one empty → 0."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


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
    """`key: value` lines → {normalized key: normalized value}; lines without a colon are ignored, the first value
    of a repeated key wins (a model that repeats a key gets no second chance)."""
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = normalize(key), normalize(value)
        if sep and key and key not in pairs:
            pairs[key] = value
    return pairs


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
