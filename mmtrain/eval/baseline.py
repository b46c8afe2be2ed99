"""The majority baseline: answer every question with the most frequent training answer for its kind of question.

A model that does not beat it has learned the answer distribution, not the products. Groups (the "kind"):
caption → one answer for all; category → per phrasing type (path / leaf); attribute_qa → per attribute;
freeform → per question template; attributes → per key, the most frequent value of every key that at least half of
the training answers have, in the training answers' most frequent key order. Ties go to the answer seen first.
It is scored by the model's scorers, with the same synonyms (`shard_synonyms`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from mmtrain.data.loader.split_records import iter_shard_samples
from mmtrain.data.shards.product_tasks import TASKS
from mmtrain.data.shards.writer import read_manifest
from mmtrain.eval.metrics import Synonyms
from mmtrain.eval.scoring import attribute_name, category_kind, freeform_question, score_items


def sample_item(record: dict[str, Any]) -> dict[str, Any] | None:
    """A shard record as a scoring item (question = the last user turn, reference = the final assistant turn); None
    for records that are not a single question / answer about a product task."""
    turns = record.get("conversation") or []
    if record.get("task") not in TASKS or len(turns) < 2 or turns[-1]["role"] != "assistant":
        return None
    return {"key": record["key"], "task": record["task"], "question": turns[-2]["content"],
            "reference": turns[-1]["content"]}


def group_of(item: dict[str, Any]) -> str:
    """The baseline's grouping of a question within its task (see the module docstring)."""
    task = item["task"]
    if task == "category":
        return category_kind(item["question"], item["reference"])
    if task == "attribute_qa":
        return attribute_name(item["key"], item["question"])
    if task == "freeform":
        return freeform_question(item["key"], item["question"])
    return ""


class MajorityBaseline:
    """Fitted on training items; `answer(item)` gives the baseline's prediction for a validation item."""

    def __init__(self, train_items: Iterable[dict[str, Any]]):
        self.answers: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.by_task: dict[str, Counter] = defaultdict(Counter)
        values: dict[str, Counter] = defaultdict(Counter)
        key_orders: Counter = Counter()
        attribute_answers = 0
        for item in train_items:
            ref = item["reference"]
            self.answers[(item["task"], group_of(item))][ref] += 1
            self.by_task[item["task"]][ref] += 1
            if item["task"] == "attributes":
                attribute_answers += 1
                keys = []
                for line in ref.splitlines():
                    key, sep, value = line.partition(":")
                    if sep:
                        values[key.strip()][value.strip()] += 1
                        keys.append(key.strip())
                key_orders[tuple(keys)] += 1
        order = list(key_orders.most_common(1)[0][0]) if key_orders else []
        order += sorted(k for k in values if k not in order)
        self.attributes = "\n".join(f"{k}: {values[k].most_common(1)[0][0]}" for k in order
                                    if sum(values[k].values()) * 2 >= attribute_answers)

    def answer(self, item: dict[str, Any]) -> str:
        task = item["task"]
        if task == "attributes":
            return self.attributes
        counts = self.answers.get((task, group_of(item))) or self.by_task.get(task)
        return counts.most_common(1)[0][0] if counts else ""


def read_items(shards_dir: str | Path, split: str, tasks: Sequence[str] | None = None,
               limit: int | None = None) -> list[dict[str, Any]]:
    """Scoring items of a shard split (images dropped), in shard order, at most `limit`."""
    items = []
    for record in iter_shard_samples(Path(shards_dir), split):
        item = sample_item(record)
        if item is not None and (tasks is None or item["task"] in tasks):
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    return items


def shard_synonyms(shards_dir: str | Path) -> Synonyms:
    """The attribute-value synonyms of the catalog spec the shards were built from (the manifest's `source.spec`);
    none for shards built without a spec (instruction files, hand-built sets)."""
    source = read_manifest(shards_dir).get("source") or {}
    return Synonyms.from_spec(source.get("spec"))


def majority_baseline(shards_dir: str | Path, split: str = "val", tasks: Sequence[str] | None = None,
                      limit: int | None = None, train_split: str = "train",
                      predictions: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{task: metrics} of the majority baseline fitted on `train_split` and scored on `split` of the same shards
    (the same samples `evaluate` scores with the same `tasks` / `limit`). Its predictions are appended to
    `predictions` when given."""
    baseline = MajorityBaseline(read_items(shards_dir, train_split, tasks))
    items = read_items(shards_dir, split, tasks, limit)
    for item in items:
        item["prediction"] = baseline.answer(item)
    if predictions is not None:
        predictions.extend(items)
    return score_items(items, tasks, shard_synonyms(shards_dir))
