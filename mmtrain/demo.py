"""The embedded default: sample catalog → shards → tokenizer → two ZeRO-3 stages on 2 ranks → export → report.

Everything it needs ships in the repo (`shards/sample/`, `launch/recipes/tiny-cpu.yaml`); it finishes in minutes on
2 CPU cores and leaves a run directory a person can inspect, resume or export again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "shards" / "sample"
SPEC = REPO / "shards" / "catalogs" / "fashion-products.yaml"
RECIPE = REPO / "launch" / "recipes" / "tiny-cpu.yaml"


SHORT_ANSWER_TASKS = ("attribute_qa", "attributes", "category")


def _stage_summary(run: Path) -> list[dict[str, Any]]:
    stages: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)  # a resumed run logs the steps after its checkpoint again: the last one counts
        stages.setdefault(record["stage"], {})[record["step"]] = record["loss"]
    out = []
    for name, by_step in stages.items():
        losses = [by_step[s] for s in sorted(by_step)]
        entry: dict[str, Any] = {"stage": name}
        k = max(1, min(5, len(losses) // 4))
        entry.update(steps=len(losses), first_loss=sum(losses[:k]) / k, last_loss=sum(losses[-k:]) / k)
        out.append(entry)
    return out


SHARD_SETS: dict[str, tuple[str, tuple[str, ...] | None, int, bool, bool]] = {
    # recipe name: (folder under DIR/shards, tasks (None: all five), samples per product and task, text-only,
    # val asks every attribute)
    # the report's set: its val products answer every attribute, so colour QA is scored on all ~290, not the ~1/5
    # that would draw colour
    "sample-mm": ("multimodal", None, 1, False, True),
    "sample-text": ("text-only", None, 1, True, False),
    # the short-answer tasks whose 1–3 answer tokens the full mix drowns among captions: the image-reading signal
    "sample-mm-qa": ("multimodal-qa", SHORT_ANSWER_TASKS, 2, False, False),
    # the same questions about the product's title: what the LLM learns to read before it learns to read photos
    "sample-text-qa": ("text-only-qa", SHORT_ANSWER_TASKS, 2, True, False),
}
"""The shard sets the demo builds from the sample catalog, by the name tiny-cpu.yaml gives them."""

VAL_FRACTION = 0.2
"""Products held out for the report: ~300 of the sample's 1,500, so a 10-point difference is ~4 standard errors
(the builder's default 5 % would leave ~80, where one answer moves a score by 1.2 points)."""


def data_overrides(recipe: Path, built: dict[str, Path]) -> list[str]:
    """`--set` lines pointing the recipe's `shards/built/sample-*` shard sets at the demo's own (`built`: name → dir)."""
    import yaml

    out = []
    for i, stage in enumerate(yaml.safe_load(recipe.read_text(encoding="utf-8"))["stages"]):
        for j, source in enumerate(stage.get("data", [])):
            target = built.get(Path(source["shards"]).name)
            if target is not None:
                out += ["--set", f"stages.{i}.data.{j}.shards={target}"]
    return out


def build_inputs(out: Path, catalog: Path) -> tuple[dict[str, Path], Path, dict[str, float]]:
    """The demo's shard sets (name → folder) and tokenizer under `out`, each built unless already there."""
    from mmtrain.data.build import build_from_catalog
    from mmtrain.data.tasks import TASKS
    from mmtrain.data.tokenizer import iter_shard_texts, train_tokenizer
    from mmtrain.data.writer import BuildOptions

    timings: dict[str, float] = {}
    built = {name: out / "shards" / folder for name, (folder, *_) in SHARD_SETS.items()}
    for name, (folder_name, tasks, per_task, text_only, every_attribute) in SHARD_SETS.items():
        folder, tick = built[name], time.perf_counter()
        if not (folder / "manifest.json").is_file():
            options = BuildOptions(out=folder, image_size=96, workers=2, shard_size=500, overwrite=True,
                                   val_fraction=VAL_FRACTION)
            summary = build_from_catalog(SPEC, catalog, None, options, tasks=tasks or TASKS, per_task=per_task,
                                         text_only=text_only, val_every_attribute=every_attribute)
            print(f"shards ({folder_name}): {summary.manifest['splits']['train']['samples']} train / "
                  f"{summary.manifest['splits']['val']['samples']} val samples → {folder}")
        timings[f"shards_{folder_name}"] = time.perf_counter() - tick
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        texts = list(iter_shard_texts(built["sample-mm"])) + list(iter_shard_texts(built["sample-text"]))
        train_tokenizer(texts, 1000, tokenizer)
        print(f"tokenizer: 1,000-piece sentencepiece → {tokenizer}")
    return built, tokenizer, timings


def run_demo(out: Path, ranks: int = 2, catalog: Path | None = None, steps_scale: float = 1.0,
             overrides: list[str] | None = None) -> dict[str, Any]:
    from mmtrain.launching import run_ranks
    from mmtrain.train.checkpoint import latest_complete
    from mmtrain.train.export import export_checkpoint

    out = out.resolve()
    started = time.perf_counter()
    built, tokenizer, timings = build_inputs(out, catalog or SAMPLE / "styles.csv")
    run = out / "run"
    args = ["--recipe", str(RECIPE), "--out", str(run), "--resume", "--set", f"tokenizer={tokenizer}",
            *data_overrides(RECIPE, built)]
    if steps_scale != 1.0:
        from mmtrain.config import load_recipe

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
    quality = evaluate_demo(model_dir, built["sample-mm"], out / "eval")
    timings["eval"] = time.perf_counter() - tick
    report = {"stages": _stage_summary(run), "train_parts": trainable, "model": str(model_dir),
              "checkpoint": str(final.path), "ranks": ranks, "quality": quality,
              "seconds": {**timings, "total": time.perf_counter() - started}}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


HEADLINE = (("category", "master_acc", "master category"), ("attribute_qa", "colour", "colour (attribute QA)"),
            ("attributes", "colour", "colour (attribute extraction)"), ("category", "leaf_acc", "article type"))


def _metric(metrics: dict[str, Any], task: str, key: str) -> float | None:
    value = metrics.get(task, {}).get(key)
    if value is None:  # per-attribute scores live in a nested mapping
        for nested in metrics.get(task, {}).values():
            if isinstance(nested, dict) and key in nested:
                return nested[key]
    return value


def evaluate_demo(model_dir: Path, shards: Path, out: Path) -> dict[str, Any]:
    """Validation scores of the trained model, the same with every image grey, and the majority baseline."""
    from mmtrain.eval import evaluate, format_table, load_model, majority_baseline, write_results

    loaded = load_model(model_dir)
    predictions: list[dict[str, Any]] = []
    model = evaluate(loaded, shards, split="val", batch_size=64, max_new_tokens=48, predictions=predictions)
    blank = evaluate(loaded, shards, split="val", batch_size=64, max_new_tokens=48, blank_images=True)
    baseline = majority_baseline(shards, split="val")
    write_results(out / "metrics.json", {"model": model, "blank_images": blank, "majority": baseline}, predictions)
    print(format_table(model, baseline, blank))
    headline = {label: {"model": _metric(model, t, k), "blank_images": _metric(blank, t, k),
                        "majority": _metric(baseline, t, k)} for t, k, label in HEADLINE}
    return {"headline": headline, "metrics": str(out / "metrics.json")}


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{'stage':<10} {'steps':>5} {'loss first':>10} {'loss last':>10}  trainable parameters by part")
    for s in report["stages"]:
        parts = report["train_parts"].get(s["stage"], {})
        print(f"{s['stage']:<10} {s['steps']:>5} {s['first_loss']:>10.4f} {s['last_loss']:>10.4f}  {parts}")
    print(f"\n{'validation accuracy':<32} {'model':>7} {'grey images':>12} {'majority':>9}")
    for label, row in report["quality"]["headline"].items():
        cells = ["–" if row[k] is None else f"{row[k]:.3f}" for k in ("model", "blank_images", "majority")]
        print(f"{label:<32} {cells[0]:>7} {cells[1]:>12} {cells[2]:>9}")
    secs = report["seconds"]
    print(f"time: {secs['total']:.0f} s (training {secs['train']:.0f} s, evaluation {secs['eval']:.0f} s); "
          f"exported model → {report['model']}")
