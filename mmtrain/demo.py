"""The embedded default: sample catalog → shards → tokenizer → two ZeRO-3 stages on 2 ranks → export → report.

Everything it needs ships in the repo (`shards/sample/`, `launch/recipes/tiny-cpu.yaml`); it finishes in minutes on
2 CPU cores and leaves a run directory a person can inspect, resume or export again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from mmtrain.config import load_recipe
from mmtrain.data.loader.tokenizer import iter_shard_texts, train_tokenizer
from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.shards.merge import SOURCE_DEFAULTS
from mmtrain.data.shards.product_tasks import TASKS
from mmtrain.data.shards.writer import BuildOptions, read_manifest
from mmtrain.errors import UserError
from mmtrain.eval import evaluate, format_table, load_model, majority_baseline, write_results
from mmtrain.launching import run_ranks
from mmtrain.run_report import find_files, stage_summary, write_report
from mmtrain.train.checkpoint import latest_complete
from mmtrain.train.export import export_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "shards" / "sample"
SPEC = REPO / "shards" / "catalogs" / "fashion-products.yaml"
RECIPE = REPO / "launch" / "recipes" / "tiny-cpu.yaml"


SHORT_ANSWER_TASKS = ("attribute_qa", "attributes", "category")


class ShardSet(NamedTuple):
    """How the demo builds one shard set from the sample catalog (`mmtrain shards build` options)."""

    folder: str
    """under DIR/shards"""
    tasks: tuple[str, ...] | None
    """None: all five"""
    per_task: int
    text_only: bool
    val_every_attribute: bool = False
    attribute_weights: dict[str, float] | None = None


SHARD_SETS: dict[str, ShardSet] = {
    # the report's set: its val products answer every attribute, so colour QA is scored on all ~290, not the ~1/5
    # that would draw colour
    "sample-mm": ShardSet("multimodal", None, 1, False, val_every_attribute=True),
    "sample-text": ShardSet("text-only", None, 1, True),
    # the short-answer tasks whose 1–3 answer tokens the full mix drowns among captions: the image-reading signal;
    # attribute QA asks colour, which the photo shows, 9 times in 10 (36 against 1 for each of the four others:
    # season, year and usage cannot be seen, and the model stays at the majority on them whatever it is asked)
    "sample-mm-qa": ShardSet("multimodal-qa", SHORT_ANSWER_TASKS, 2, False, attribute_weights={"colour": 36.0}),
    # the same questions about the product's title: what the LLM learns to read before it learns to read photos
    "sample-text-qa": ShardSet("text-only-qa", SHORT_ANSWER_TASKS, 2, True),
}
"""The shard sets the demo builds from the sample catalog, by the name tiny-cpu.yaml gives them."""

VAL_FRACTION = 0.2
"""Products held out to choose the demo's knobs on (~290 of the sample's 1,500): every knob of the demo and its
recipe (attribute weights, steps, learning rates) was chosen on this split's scores."""
TEST_FRACTION = 0.2
"""Products held out from every choice (~290): the figures the report and README give. 10 points are ~4 standard
errors there (the builder's default 5 % would leave ~80, where one answer moves a score by 1.2 points)."""
QUICK_STEPS_SCALE = 0.1
"""`mmtrain demo --quick`: the same path at a tenth of the steps (CI runs it)…"""
QUICK_EVAL_SAMPLES = 360
"""… scored on the first samples of each held-out split (~40 products, every task): scoring all of them took longer
than the quick run's training."""


IMAGE_SIZE = 96
"""Longest side of the shards' images: above the tiny model's 64 px, far below the catalog's 1800."""


def build_shard_set(folder: Path, spec: ShardSet, catalog: Path) -> None:
    options = BuildOptions(out=folder, image_size=IMAGE_SIZE, workers=2, shard_size=500, overwrite=True,
                           val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION)
    summary = build_from_catalog(SPEC, catalog, None, options, tasks=spec.tasks or TASKS, per_task=spec.per_task,
                                 text_only=spec.text_only, val_every_attribute=spec.val_every_attribute,
                                 attribute_weights=spec.attribute_weights)
    counts = " / ".join(f"{info['samples']} {split}" for split, info in summary.manifest["splits"].items())
    print(f"shards ({spec.folder}): {counts} samples → {folder}")


def check_reusable(folder: Path, spec: ShardSet, catalog: Path) -> None:
    """A shard set already in the demo's folder (a rerun resumes) must be what this demo would build: one left by an
    older demo with other options, or built from another `--catalog`, would silently train and score on other data."""
    manifest = read_manifest(folder)
    source = {**SOURCE_DEFAULTS, **(manifest.get("source") or {})}  # fields newer than the manifest read as off
    have = {k: source.get(k) for k in ("catalog", "tasks", "per_task", "text_only", "val_every_attribute",
                                       "attribute_weights")}
    have.update(val_fraction=manifest.get("val_fraction"), test_fraction=manifest.get("test_fraction", 0.0),
                image_size=manifest.get("image_size"))
    want = {"catalog": str(catalog), "tasks": list(spec.tasks or TASKS), "per_task": spec.per_task,
            "text_only": spec.text_only, "val_every_attribute": spec.val_every_attribute,
            "attribute_weights": dict(spec.attribute_weights or {}), "val_fraction": VAL_FRACTION,
            "test_fraction": TEST_FRACTION, "image_size": IMAGE_SIZE}
    differ = [f"{k} {have[k]!r} (this demo: {want[k]!r})" for k in want if have[k] != want[k]]
    if differ:
        raise UserError(f"{folder} was built with other options than this demo's: {'; '.join(differ)}. "
                        f"It was left by an older or another demo; delete {folder.parent.parent} or give another --out")


def data_overrides(recipe: Path, built: dict[str, Path]) -> list[str]:
    """`--set` lines pointing the recipe's `shards/built/sample-*` shard sets at the demo's own (`built`: name → dir)."""
    out = []
    for i, stage in enumerate(yaml.safe_load(recipe.read_text(encoding="utf-8"))["stages"]):
        for j, source in enumerate(stage.get("data", [])):
            target = built.get(Path(source["shards"]).name)
            if target is not None:
                out += ["--set", f"stages.{i}.data.{j}.shards={target}"]
    return out


def build_inputs(out: Path, catalog: Path) -> tuple[dict[str, Path], Path, dict[str, float]]:
    """The demo's shard sets (name → folder) and tokenizer under `out`, each built unless already there."""
    timings: dict[str, float] = {}
    built = {name: out / "shards" / spec.folder for name, spec in SHARD_SETS.items()}
    for name, spec in SHARD_SETS.items():
        folder, tick = built[name], time.perf_counter()
        if (folder / "manifest.json").is_file():
            check_reusable(folder, spec, catalog)
        else:
            build_shard_set(folder, spec, catalog)
        timings[f"shards_{spec.folder}"] = time.perf_counter() - tick
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        texts = list(iter_shard_texts(built["sample-mm"])) + list(iter_shard_texts(built["sample-text"]))
        train_tokenizer(texts, 1000, tokenizer)
        print(f"tokenizer: 1,000-piece sentencepiece → {tokenizer}")
    return built, tokenizer, timings


def run_demo(out: Path, ranks: int = 2, catalog: Path | None = None, steps_scale: float = 1.0,
             overrides: list[str] | None = None, eval_limit: int | None = None) -> dict[str, Any]:
    """The whole job into `out`; `eval_limit` scores only the first samples of each held-out split."""
    out = out.resolve()
    started = time.perf_counter()
    built, tokenizer, timings = build_inputs(out, catalog or SAMPLE / "styles.csv")
    run = out / "run"
    args = ["--recipe", str(RECIPE), "--out", str(run), "--resume", "--set", f"tokenizer={tokenizer}",
            *data_overrides(RECIPE, built)]
    if steps_scale != 1.0:
        for i, stage in enumerate(load_recipe(RECIPE).stages):
            args += ["--set", f"stages.{i}.steps={max(2, int(stage.steps * steps_scale))}",
                     "--set", f"stages.{i}.save_every=0"]
    for item in overrides or []:
        args += ["--set", item]
    tick = time.perf_counter()
    print(f"training: {ranks} ranks, ZeRO-3, log → {run / 'train.log'}")
    result = run_ranks(ranks, args, log=run / "train.log")
    timings["train"] = time.perf_counter() - tick
    if result.returncode != 0:
        raise UserError(f"training failed (exit {result.returncode}); see {run / 'train.log'}")
    final = latest_complete(run / "checkpoints")
    model_dir = out / "model"
    export_checkpoint(final.path, model_dir, merge=True)
    trainable = {}
    for line in (run / "stages.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        trainable[event["stage"]] = event["trainable"]
    tick = time.perf_counter()
    quality = evaluate_demo(model_dir, built["sample-mm"], out / "eval", eval_limit)
    timings["eval"] = time.perf_counter() - tick
    pictures = write_pictures(out)
    report = {"stages": stage_summary(run), "train_parts": trainable, "pictures": pictures, "model": str(model_dir),
              "checkpoint": str(final.path), "ranks": ranks, "quality": quality,
              "seconds": {**timings, "total": time.perf_counter() - started}}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


HEADLINE: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...] = (
    ("category", ("master_acc",), ("path_n",), "master category"),
    ("attribute_qa", ("per_attribute", "colour"), ("per_attribute_n", "colour"), "colour (attribute QA)"),
    ("attributes", ("per_attribute", "colour", "f1"), ("per_attribute", "colour", "support"),
     "colour (attribute extraction F1)"),
    ("category", ("leaf_acc",), ("n",), "article type"))
"""The report's rows: (task, path to the score, path to its number of scored items, label)."""


def _lookup(metrics: dict[str, Any], task: str, path: tuple[str, ...]) -> Any:
    value: Any = metrics.get(task, {})
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def standard_error(score: float | None, n: int | None) -> float | None:
    """One standard error of a proportion scored on n items, sqrt(p(1-p)/n)."""
    if score is None or not n:
        return None
    return math.sqrt(max(score * (1.0 - score), 0.0) / n)


def headline_rows(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{label: {column: score, "n": items, "se": the model's standard error}} for the HEADLINE rows; `scores` maps a
    column (model, blank_images, majority) to its metrics."""
    rows = {}
    for task, path, n_path, label in HEADLINE:
        row: dict[str, Any] = {column: _lookup(metrics, task, path) for column, metrics in scores.items()}
        row["n"] = _lookup(scores["model"], task, n_path)
        row["se"] = standard_error(row["model"], row["n"])
        rows[label] = row
    return rows


def split_products(shards: Path) -> dict[str, int]:
    """Products per split of the report's shard set."""
    splits = read_manifest(shards)["splits"]
    return {split: splits[split]["products"] for split in ("train", "val", "test") if split in splits}


def evaluate_demo(model_dir: Path, shards: Path, out: Path, limit: int | None = None) -> dict[str, Any]:
    """Test scores of the trained model, the same with every image grey, and the majority baseline; and the model's
    validation scores, the split the demo's knobs were chosen on."""
    loaded = load_model(model_dir)
    predictions: list[dict[str, Any]] = []
    settings: dict[str, Any] = {"batch_size": 64, "max_new_tokens": 48, "limit": limit}
    model = evaluate(loaded, shards, split="test", predictions=predictions, **settings)
    blank = evaluate(loaded, shards, split="test", blank_images=True, **settings)
    baseline = majority_baseline(shards, split="test", limit=limit)
    validation = evaluate(loaded, shards, split="val", **settings)
    write_results(out / "metrics.json", {"model": model, "blank_images": blank, "majority": baseline,
                                         "validation": validation}, predictions)
    print(format_table(model, baseline, blank))
    return {"split_products": split_products(shards), "eval_limit": limit,
            "headline": headline_rows({"model": model, "blank_images": blank, "majority": baseline}),
            "validation": headline_rows({"model": validation}), "attributes": model.get("attributes"),
            "caption": {k: model.get("caption", {}).get(k) for k in ("n", "bleu", "rouge_l")},
            "metrics": str(out / "metrics.json")}


def write_pictures(out: Path) -> list[str]:
    """`mmtrain report`'s loss / lr curves and per-attribute F1 chart under out/report, where matplotlib is installed
    (the `report` extra); none without it, with a line saying how to get them."""
    if importlib.util.find_spec("matplotlib") is None:
        print("pictures: pip install 'mmtrain[report]', then mmtrain report " + str(out))
        return []
    return [str(p) for p in write_report(find_files(out))]


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{'stage':<10} {'steps':>5} {'loss first':>10} {'loss last':>10}  trainable parameters by part")
    for s in report["stages"]:
        parts = report["train_parts"].get(s["stage"], {})
        print(f"{s['stage']:<10} {s['steps']:>5} {s['first_loss']:>10.4f} {s['last_loss']:>10.4f}  {parts}")
    quality = report["quality"]
    sizes = ", ".join(f"{split} {n}" for split, n in quality["split_products"].items())
    scored = "" if quality["eval_limit"] is None else f"; scored: the first {quality['eval_limit']} samples of each"
    print(f"\nproducts: {sizes}{scored}")
    print(f"{'test':<34} {'model':>7} {'± se':>6} {'grey images':>12} {'majority':>9} {'validation':>11}")
    for label, row in quality["headline"].items():
        cells = ["–" if row[k] is None else f"{row[k]:.3f}" for k in ("model", "se", "blank_images", "majority")]
        val = quality["validation"][label]["model"]
        print(f"{label:<34} {cells[0]:>7} {cells[1]:>6} {cells[2]:>12} {cells[3]:>9} "
              f"{'–' if val is None else f'{val:.3f}':>11}")
    secs = report["seconds"]
    print(f"time: {secs['total']:.0f} s (training {secs['train']:.0f} s, evaluation {secs['eval']:.0f} s); "
          f"exported model → {report['model']}")
