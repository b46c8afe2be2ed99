"""Text → token ids with a bounded cache, so the strings a template repeats are tokenized once.

Why: a rendered sample is ~9 pieces and most are repeats (the system line, role markers, the handful of fixed prompt
phrasings of each product task); only the answer is usually new. Calling the tokenizer costs ~10 µs per call even
for a short string, so the loader's template looks every piece up here first and sends only the unseen ones, in one
batched call. The ids are exactly the tokenizer's (the cache stores what it returned for that very text).

Bounded as an approximate LRU in two generations (cheaper per hit than an ordered dict): new and recently used texts
live in `young`; when it fills it becomes `old` and a fresh `young` starts; a hit in `old` moves the text back to
`young`, so what keeps being used stays and one-off texts (most answers) fall out after two generations. The
template's own strings are kept apart and never evicted.
"""

from __future__ import annotations

from typing import Callable, Sequence

Encoder = Callable[[list[str]], list[list[int]]]


class TokenCache:
    """`ids(texts)` gives each text's token ids (no special tokens), tokenizing the unseen ones in one call."""

    def __init__(self, encode_batch: Encoder, fixed: Sequence[str] = (), size: int = 8192, max_chars: int = 512):
        self.encode_batch = encode_batch
        self.max_chars = max_chars
        self.generation = max(1, size // 2)
        fixed = list(dict.fromkeys(t for t in fixed if t))
        self.fixed: dict[str, list[int]] = dict(zip(fixed, encode_batch(fixed))) if fixed else {}
        self.fixed[""] = []
        self.young: dict[str, list[int]] = {}
        self.old: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.fixed) + len(self.young) + len(self.old)

    def get(self, text: str) -> list[int] | None:
        """Cached ids of `text`, or None."""
        ids = self.fixed.get(text)
        if ids is None:
            ids = self.young.get(text)
            if ids is None:
                ids = self.old.pop(text, None)
                if ids is not None:
                    self._keep(text, ids)
        return ids

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of every text, in order; the texts not cached are tokenized together and cached when short."""
        out: list[list[int] | None] = [self.get(t) for t in texts]
        missing = [t for t, ids in zip(texts, out) if ids is None]
        if missing:
            unique = list(dict.fromkeys(missing))
            found = dict(zip(unique, self.encode_batch(unique)))
            for text, ids in found.items():
                if len(text) < self.max_chars:
                    self._keep(text, ids)
            out = [found[t] if ids is None else ids for t, ids in zip(texts, out)]
        return out  # type: ignore[return-value]

    def _keep(self, text: str, ids: list[int]) -> None:
        young = self.young
        young[text] = ids
        if len(young) >= self.generation:
            self.old, self.young = young, {}
