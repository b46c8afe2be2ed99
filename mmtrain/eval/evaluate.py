"""`evaluate(model_dir, shards_dir)`: answer every validation question, score per task, add the answer loss.

The flow: shard records of the split → prompts rendered with the training template (reference answer kept for the
teacher-forced loss) → batched greedy generation → per-task scores (`scoring.py`) + token-weighted loss per task.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from mmtrain.data.loader.split_records import iter_shard_samples
from mmtrain.data.shards.product_tasks import TASKS
from mmtrain.errors import UserError
from mmtrain.eval.baseline import sample_item, shard_synonyms
from mmtrain.eval.generate import Generator, LoadedModel, load_model, mean_loss
from mmtrain.eval.scoring import score_items


def check_tasks(tasks: Sequence[str] | None) -> list[str] | None:
    if tasks is None:
        return None
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    return list(tasks)


def read_samples(shards_dir: str | Path, split: str, tasks: Sequence[str] | None,
                 limit: int | None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(record with images, scoring item) of the split's product-task samples, in shard order, at most `limit`."""
    folder = Path(shards_dir)
    if not (folder / "manifest.json").is_file():
        raise UserError(f"{folder}: no manifest.json (not a shard directory)")
    out = []
    for record in iter_shard_samples(folder, split):
        item = sample_item(record)
        if item is not None and (tasks is None or item["task"] in tasks):
            out.append((record, item))
            if limit is not None and len(out) >= limit:
                break
    return out


def evaluate(model_dir: str | Path | LoadedModel, shards_dir: str | Path, split: str = "val",
             tasks: Sequence[str] | None = None, blank_images: bool = False, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 64, template: str | None = None, with_loss: bool = True,
             predictions: list[dict[str, Any]] | None = None, device: str | None = None,
             progress: bool = False) -> dict[str, dict[str, Any]]:
    """{task: metrics} for the model on `split` of `shards_dir` (see docs/eval.md for every metric). Greedy
    decoding. `blank_images` feeds a constant grey image instead of every image. Per-sample predictions are
    appended to `predictions` when given. `model_dir` may be an already loaded model (to evaluate twice)."""
    tasks = check_tasks(tasks)
    loaded = model_dir if isinstance(model_dir, LoadedModel) else load_model(model_dir, template, device)
    gen = Generator(loaded)
    samples = read_samples(shards_dir, split, tasks, limit)
    items = [item for _, item in samples]
    prompts = []
    for record, item in samples:
        turns = record["conversation"][:-1]
        prompts.append(gen.prompt(turns, record["images"], item["reference"], item["key"]))
    answers: list[str] = []
    bar = tqdm(total=len(prompts), desc="eval", unit="sample", disable=not progress, dynamic_ncols=True)
    step = max(batch_size * 4, 1)  # generate in chunks so the bar moves; batching happens inside each chunk
    for first in range(0, len(prompts), step):
        answers += gen.generate(prompts[first:first + step], max_new_tokens=max_new_tokens, batch_size=batch_size,
                                blank_images=blank_images)
        bar.update(min(step, len(prompts) - first))
    bar.close()
    nll = gen.answer_nll(prompts, batch_size, blank_images) if with_loss else [(0.0, 0)] * len(prompts)
    for item, answer, (total, count) in zip(items, answers, nll):
        item["prediction"] = answer
        if with_loss:
            item["loss"] = total / count if count else None
    metrics = score_items(items, tasks, shard_synonyms(shards_dir))
    if with_loss:
        per_task: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for item, pair in zip(items, nll):
            per_task[item["task"]].append(pair)
        for task, task_metrics in metrics.items():
            task_metrics.update(mean_loss(per_task.get(task, [])))
    if predictions is not None:
        predictions.extend({**item, "blank_images": blank_images} for item in items)
    return metrics


def write_results(out: str | Path, results: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> Path:
    """`out` (metrics.json) and `predictions.jsonl` beside it. Returns the predictions path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    path = out.with_name("predictions.jsonl")
    with path.open("w", encoding="utf-8") as fh:
        for row in predictions:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def flat_metrics(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"task metric": value} with nested scores spelled out: "attributes micro f1", "attributes colour f1" (a
    `per_attribute` row of P / R / F1 / support), "attribute_qa colour acc" and "attribute_qa colour n" (a
    per-attribute accuracy and its question count)."""
    flat: dict[str, Any] = {}
    for task, values in metrics.items():
        for name, value in values.items():
            if name == "per_attribute":
                for attribute, scores in value.items():
                    if isinstance(scores, dict):
                        flat.update({f"{task} {attribute} {k}": v for k, v in scores.items()})
                    else:
                        flat[f"{task} {attribute} acc"] = scores
            elif name == "per_attribute_n":
                flat.update({f"{task} {attribute} n": n for attribute, n in value.items()})
            elif isinstance(value, dict):
                flat.update({f"{task} {name} {k}": v for k, v in value.items()})
            else:
                flat[f"{task} {name}"] = value
    return flat


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def format_table(model_metrics: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]] | None = None,
                 blank: dict[str, dict[str, Any]] | None = None) -> str:
    """A plain-text table: one row per task metric (attribute extraction: micro and macro P / R / F1, then P / R / F1
    / support of every attribute), columns model | blank images | majority baseline (the last two only when given)."""
    columns = [("model", flat_metrics(model_metrics))]
    if blank is not None:
        columns.append(("blank images", flat_metrics(blank)))
    if baseline is not None:
        columns.append(("majority", flat_metrics(baseline)))
    names = list(dict.fromkeys(name for _, flat in columns for name in flat))
    width = max([len(n) for n in names] + [6])
    cell = max([12] + [len(_cell(v)) for _, flat in columns for v in flat.values()])
    lines = [f"{'metric':<{width}}" + "".join(f"  {title:>{cell}}" for title, _ in columns)]
    lines.append("-" * len(lines[0]))
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(f"  {_cell(flat.get(name)):>{cell}}" for _, flat in columns))
    return "\n".join(lines)
