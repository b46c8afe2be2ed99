"""PUMGPT's five product tasks: one `Product` → instruction conversations, phrasings drawn by a seeded RNG.

Each product's draws come from an RNG seeded by (seed, product id, task), never from a shared stream, so a sample's
text does not depend on the order or the worker that built it: the same seed gives the same shards.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from mmtrain.data.shards.catalog import Product
from mmtrain.data.shards.records import Sample

IMAGE_MARK = "<image>"
TASKS = ("caption", "category", "attributes", "attribute_qa", "freeform")
SOURCE_CATALOG = "catalog"


CAPTION_PROMPTS = (
    "Describe this product.",
    "Write a short title for this product.",
    "What is this product? Answer with its catalog title.",
    "Give this item a product name as it would appear in an online store.",
    "Caption this product.",
    "How would you name this item in a catalog?",
    "Write a one-line description of this product.",
    "Summarize what this product is in a single line.",
)

# (prompt, answer with the full path or only the leaf)
CATEGORY_PROMPTS = (
    ("What category does this product belong to?", "path"),
    ("Give the full category path of this product, from the broadest to the most specific.", "path"),
    ("Classify this product into the catalog's category tree.", "path"),
    ("Which department, section and product type is this item listed under?", "path"),
    ("What type of product is this?", "leaf"),
    ("What kind of item is shown? Answer with the product type only.", "leaf"),
    ("Name the most specific category of this product.", "leaf"),
    ("Which product type would a shopper search for to find this item?", "leaf"),
)

ATTRIBUTE_PROMPTS = (
    "List the attributes of this product.",
    "Extract the product attributes as key: value lines.",
    "What are the attributes of this item? One per line, as key: value.",
    "Give the structured attributes of this product.",
    "Fill in this product's attribute table, one 'key: value' per line.",
    "Which attributes describe this product? Answer as key: value pairs.",
    "Extract every attribute you can for this catalog item.",
    "Return the attributes of this product, one per line.",
)

ATTRIBUTE_QA_PROMPTS = (
    "What is the {name} of this product?",
    "What {name} is this item?",
    "Tell me the {name} of this product.",
    "Which {name} does this product have?",
    "Identify the {name} of the item.",
    "What's this product's {name}?",
    "Answer with one value: the {name} of this product.",
    "For this product, what is the {name}?",
)

# Free-form questions answerable from the catalog fields: (attribute needed, question, answer template).
FREEFORM_QA = (
    ("usage", "What occasion is this product suitable for?", "It is meant for {usage} use."),
    ("usage", "Could I wear or use this for a {usage} occasion?", "Yes, it is designed for {usage} use."),
    ("season", "In which season would this product be most suitable?", "It is best suited to the {season} season."),
    ("season", "Is this item made for a particular time of year?", "Yes, it belongs to the {season} collection."),
    ("gender", "Who is this product made for?", "It is made for {gender}."),
    ("gender", "Is this item designed for men, women, boys, girls or everyone?", "It is designed for {gender}."),
    ("year", "Which collection year is this product from?", "It comes from the {year} collection."),
    ("colour", "What colour would you call this item, in a full sentence?", "This item is {colour}."),
    ("leaf", "What would you use this item as?", "This is a {leaf} product."),
)

# Text-only variants: the product's text stands in for the image.
TEXT_CONTEXT = "Product: {title}"
TEXT_CONTEXT_DETAILS = "Product details:\n{details}"

T = TypeVar("T")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_key_part(text: str) -> str:
    """A product id as it may appear in a tar member key: no dots or slashes, still unique per id."""
    cleaned = _KEY_SAFE.sub("_", text)
    if cleaned != text:
        cleaned += "_" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return cleaned


class Draws:
    """Counter-based draws for one (seed, product, task): draw k is a hash of (seed, product, task, k).

    Like a seeded `random.Random`, but with nothing to set up per product (seeding a Mersenne Twister costs more
    than everything else the builder does for a sample) and independent of build order and worker.
    """

    __slots__ = ("_prefix", "_count")

    def __init__(self, seed: int, product_id: str, task: str) -> None:
        self._prefix = f"{seed}\x00{product_id}\x00{task}\x00".encode("utf-8")
        self._count = 0

    def randrange(self, n: int) -> int:
        digest = hashlib.blake2b(self._prefix + str(self._count).encode(), digest_size=8).digest()
        self._count += 1
        return int.from_bytes(digest, "big") % n

    def choice(self, items: Sequence[T]) -> T:
        return items[self.randrange(len(items))]

    def weighted_choice(self, items: Sequence[T], weights: Sequence[float]) -> T:
        """One of `items`, item i with probability weights[i] / sum(weights) (all weights > 0)."""
        point = self.randrange(1 << 53) / (1 << 53) * sum(weights)
        for item, weight in zip(items, weights):
            point -= weight
            if point < 0:
                return item
        return items[-1]  # rounding at the very top of the range


def product_rng(seed: int, product_id: str, task: str) -> Draws:
    return Draws(seed, product_id, task)


def _details(product: Product) -> str:
    lines = []
    if product.category:
        lines.append("category: " + " > ".join(product.category))
    lines += [f"{k}: {v}" for k, v in product.attributes.items()]
    return "\n".join(lines)


def _leaf_article(product: Product) -> str:
    return product.category[-1] if product.category else ""


def _caption(product: Product, rng: Draws, text_only: bool) -> tuple[str, str, str] | None:
    if text_only and not _details(product):
        return None  # nothing but the title to go on: the answer would be in the question
    idx = rng.randrange(len(CAPTION_PROMPTS))
    answer = product.title if text_only or not product.description else f"{product.title}. {product.description}"
    return str(idx), CAPTION_PROMPTS[idx], answer


def _category(product: Product, rng: Draws, text_only: bool) -> tuple[str, str, str] | None:
    if not product.category:
        return None
    idx = rng.randrange(len(CATEGORY_PROMPTS))
    prompt, target = CATEGORY_PROMPTS[idx]
    answer = " > ".join(product.category) if target == "path" else product.category[-1]
    return str(idx), prompt, answer


def _attributes(product: Product, rng: Draws, text_only: bool) -> tuple[str, str, str] | None:
    if not product.attributes:
        return None
    idx = rng.randrange(len(ATTRIBUTE_PROMPTS))
    return str(idx), ATTRIBUTE_PROMPTS[idx], "\n".join(f"{k}: {v}" for k, v in product.attributes.items())


def _ask_attribute(product: Product, rng: Draws, name: str) -> tuple[str, str, str]:
    """The question about attribute `name` (a phrasing drawn) and its answer."""
    idx = rng.randrange(len(ATTRIBUTE_QA_PROMPTS))
    return f"{name}-{idx}", ATTRIBUTE_QA_PROMPTS[idx].format(name=name), product.attributes[name]


def _attribute_qa(product: Product, rng: Draws, text_only: bool) -> tuple[str, str, str] | None:
    if not product.attributes:
        return None
    return _ask_attribute(product, rng, rng.choice(sorted(product.attributes)))


def _weighted_attribute_qa(product: Product, rng: Draws,
                            weights: Mapping[str, float]) -> tuple[str, str, str] | None:
    """Attribute QA whose attribute is drawn with `weights` by name (1 for names not given), not uniformly."""
    if not product.attributes:
        return None
    names = sorted(product.attributes)
    return _ask_attribute(product, rng, rng.weighted_choice(names, [weights.get(n, 1.0) for n in names]))


def _freeform(product: Product, rng: Draws, text_only: bool) -> tuple[str, str, str] | None:
    values = dict(product.attributes)
    if product.category:
        values["leaf"] = _leaf_article(product)
    usable = [i for i, (need, _, _) in enumerate(FREEFORM_QA) if values.get(need)]
    if not usable:
        return None
    idx = rng.choice(usable)
    _, question, answer = FREEFORM_QA[idx]
    return str(idx), question.format(**values), answer.format(**values)


TASK_BUILDERS: dict[str, Callable[[Product, Draws, bool], tuple[str, str, str] | None]] = {
    "caption": _caption,
    "category": _category,
    "attributes": _attributes,
    "attribute_qa": _attribute_qa,
    "freeform": _freeform,
}


def _user_turn(product: Product, task: str, prompt: str, text_only: bool) -> str:
    if not text_only:
        return "\n".join([IMAGE_MARK] * len(product.image_paths) + [prompt])
    if task == "caption":
        return TEXT_CONTEXT_DETAILS.format(details=_details(product)) + "\n" + prompt
    return TEXT_CONTEXT.format(title=product.title) + "\n" + prompt


def _every_attribute_qa(product: Product, rng: Draws) -> list[tuple[str, str, str]]:
    """One question per attribute (names in sorted order, a phrasing drawn for each): the evaluation form."""
    return [_ask_attribute(product, rng, name) for name in sorted(product.attributes)]


def product_samples(product: Product, tasks: Sequence[str] = TASKS, per_task: int = 1, seed: int = 0,
                    text_only: bool = False, every_attribute: bool = False,
                    attribute_weights: Mapping[str, float] | None = None) -> list[Sample]:
    """All samples of one product: `per_task` conversations for each task that the product's fields can answer.

    A task whose fields the product lacks (no category, no attributes) yields nothing for it rather than a wrong answer.
    `every_attribute`: attribute QA asks each of the product's attributes once (per_task does not apply to it) instead
    of drawing one per sample, so a validation split scores every attribute on every product (the builder's
    `--val-every-attribute`): with one drawn attribute of five, a per-attribute score rests on a fifth of the products.
    `attribute_weights` (attribute name → weight, 1 for names not given): attribute QA draws its attribute with these
    weights instead of uniformly, e.g. {"colour": 4} asks colour half the time among five attributes. Empty or None
    draws exactly as before (byte-identical shards).
    """
    unknown = [t for t in tasks if t not in TASK_BUILDERS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(TASK_BUILDERS)}")
    samples: list[Sample] = []
    base = safe_key_part(product.product_id)
    variant = "txt" if text_only else "img"
    for task in tasks:
        rng = product_rng(seed, product.product_id, task)
        drawn: Iterable[tuple[str, str, str] | None]
        if every_attribute and task == "attribute_qa":
            drawn = _every_attribute_qa(product, rng)
        elif attribute_weights and task == "attribute_qa":
            drawn = (_weighted_attribute_qa(product, rng, attribute_weights) for _ in range(per_task))
        else:  # lazily: the first None (a field the product lacks) ends the task's draws, so later draws never run
            drawn = (TASK_BUILDERS[task](product, rng, text_only) for _ in range(per_task))
        for n, built in enumerate(drawn):
            if built is None:
                break
            phrasing, prompt, answer = built
            conversation = [{"role": "user", "content": _user_turn(product, task, prompt, text_only)},
                            {"role": "assistant", "content": answer}]
            key = f"{base}_{task}_{variant}{n}_{safe_key_part(phrasing)}"
            samples.append(Sample(key, conversation, task, SOURCE_CATALOG, product.product_id,
                                  0 if text_only else len(product.image_paths)))
    return samples
