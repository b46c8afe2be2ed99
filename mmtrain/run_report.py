"""A run's pictures from its files: per stage the loss and lr curves from `metrics.jsonl`, the per-attribute F1 of an
evaluation's `metrics.json` (beside the majority baseline's), and `summary.json` (`mmtrain report`, the demo).

Pure functions read the series (`stage_series`, `attribute_f1`) and summarise them (`stage_summary`); the figures are
drawn from exactly those series, so a test checks what is plotted without looking at pixels. Only JSON is read here:
no trainer or evaluator is imported. matplotlib is an extra (pip install 'mmtrain[report]'), loaded only to draw.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtrain.errors import UserError

FIGSIZE = (10.0, 4.0)
DPI = 100
"""Every PNG is FIGSIZE × DPI pixels (1000 × 400)."""
MAX_LOSS_AVERAGE = 5
"""`stage_summary` averages up to this many steps at each end of a stage (a quarter of its steps at most)."""
ATTRIBUTE_CHART = "attributes-f1.png"
"""The per-attribute F1 bars, in the report folder when the evaluation scores attribute extraction."""


@dataclass
class StageSeries:
    """One stage's steps in order, with the loss and lr of each (the last record of a step logged twice)."""

    name: str
    index: int
    """its place in the recipe (the records' stage_index)"""
    steps: list[int]
    loss: list[float]
    lr: list[float]


@dataclass
class AttributeScores:
    """Per-attribute F1 of the model and, where the results have it, of the majority baseline (None: no score)."""

    names: list[str]
    model: list[float | None]
    majority: list[float | None] | None


@dataclass
class RunFiles:
    """What `mmtrain report` reads and where it writes."""

    metrics: Path
    """metrics.jsonl"""
    evaluation: Path | None
    """metrics.json of `mmtrain eval --out` / the demo, when there is one"""
    out: Path
    """the report folder"""


def read_records(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """Every step record of a `metrics.jsonl`, in file order."""
    if not metrics_jsonl.is_file():
        raise UserError(f"{metrics_jsonl} does not exist (a run directory has one once a step is logged)")
    records = []
    for number, line in enumerate(metrics_jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{metrics_jsonl}:{number}: not a JSON record ({exc})") from None
    return records


def stage_series(records: list[dict[str, Any]]) -> list[StageSeries]:
    """Per stage (in the order stages first appear) its steps in order. A resumed run logs the steps after its
    checkpoint again: the last record of a step counts."""
    by_stage: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        by_stage.setdefault(record["stage"], {})[record["step"]] = record
    out = []
    for order, (name, by_step) in enumerate(by_stage.items()):
        steps = sorted(by_step)
        index = by_step[steps[0]].get("stage_index", order)
        out.append(StageSeries(name, index, steps, [by_step[s]["loss"] for s in steps],
                               [by_step[s]["lr"] for s in steps]))
    return out


def summarize(series: list[StageSeries]) -> list[dict[str, Any]]:
    """Per stage: steps, and the mean loss of its first and last k steps (k = a quarter of the steps, 1 to 5), so one
    noisy step does not decide the figure."""
    out = []
    for stage in series:
        losses = stage.loss
        k = max(1, min(MAX_LOSS_AVERAGE, len(losses) // 4))
        out.append({"stage": stage.name, "steps": len(losses), "first_loss": sum(losses[:k]) / k,
                    "last_loss": sum(losses[-k:]) / k})
    return out


def stage_summary(run: Path) -> list[dict[str, Any]]:
    """`summarize` of the run directory `run`'s metrics.jsonl (the demo's report.json `stages`)."""
    return summarize(stage_series(read_records(run / "metrics.jsonl")))


def attribute_f1(results: dict[str, Any]) -> AttributeScores | None:
    """Per-attribute F1 of `results["model"]["attributes"]["per_attribute"]` (and the majority's for the same
    attributes); None where the results score no attribute extraction."""
    model = _per_attribute(results.get("model"))
    if not model:
        return None
    names = list(model)
    majority = _per_attribute(results.get("majority"))
    return AttributeScores(names, [model[n] for n in names],
                           [majority.get(n) for n in names] if majority is not None else None)


def _per_attribute(scores: Any) -> dict[str, float | None] | None:
    per = scores.get("attributes", {}).get("per_attribute") if isinstance(scores, dict) else None
    if not isinstance(per, dict):
        return None
    return {name: row.get("f1") for name, row in per.items() if isinstance(row, dict) and "f1" in row}


def find_files(path: Path, evaluation: Path | None = None, out: Path | None = None) -> RunFiles:
    """A run directory (metrics.jsonl, eval/metrics.json) or a demo directory (run/metrics.jsonl, eval/metrics.json);
    `evaluation` names another metrics.json, `out` another report folder (default PATH/report)."""
    if (path / "metrics.jsonl").is_file():
        metrics = path / "metrics.jsonl"
    elif (path / "run" / "metrics.jsonl").is_file():
        metrics = path / "run" / "metrics.jsonl"
    else:
        raise UserError(f"no metrics.jsonl in {path} or {path / 'run'}: give a run directory (--out of a training "
                        "run) or a demo directory")
    if evaluation is not None and not evaluation.is_file():
        raise UserError(f"--eval {evaluation} does not exist")
    found = path / "eval" / "metrics.json"
    return RunFiles(metrics, evaluation or (found if found.is_file() else None), out or path / "report")


def write_report(files: RunFiles) -> list[Path]:
    """The PNGs and summary.json in `files.out`; returns the paths written."""
    series = stage_series(read_records(files.metrics))
    results = json.loads(files.evaluation.read_text(encoding="utf-8")) if files.evaluation else {}
    scores = attribute_f1(results)
    pyplot()  # before any file is written: a missing extra leaves nothing half done
    files.out.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in series:
        path = files.out / f"stage{stage.index}-{_file_part(stage.name)}.png"
        save(stage_figure(stage), path)
        written.append(path)
    if scores is not None:
        path = files.out / ATTRIBUTE_CHART
        save(attribute_figure(scores), path)
        written.append(path)
    summary: dict[str, Any] = {"metrics": str(files.metrics), "stages": summarize(series)}
    if scores is not None:
        summary["evaluation"] = str(files.evaluation)
        summary["attribute_f1"] = {"model": dict(zip(scores.names, scores.model))}
        if scores.majority is not None:
            summary["attribute_f1"]["majority"] = dict(zip(scores.names, scores.majority))
    path = files.out / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return written + [path]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), or a UserError naming the extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UserError(f"mmtrain report draws with matplotlib, which cannot be imported ({exc}): "
                        "pip install 'mmtrain[report]'") from None
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt


def stage_figure(stage: StageSeries) -> Any:
    """Two panels: the loss and the lr of each step of the stage."""
    fig, (loss, lr) = pyplot().subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    fig.suptitle(f"stage {stage.name}: {len(stage.steps)} steps")
    loss.plot(stage.steps, stage.loss, color="tab:blue", linewidth=1)
    loss.set(xlabel="step", ylabel="loss", title="loss")
    lr.plot(stage.steps, stage.lr, color="tab:orange", linewidth=1)
    lr.set(xlabel="step", ylabel="learning rate", title="lr")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss, lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def attribute_figure(scores: AttributeScores) -> Any:
    """Bars of each attribute's F1: the model's, and the majority baseline's beside it when there is one."""
    fig, ax = pyplot().subplots(figsize=FIGSIZE, dpi=DPI)
    places = list(range(len(scores.names)))
    bars = [("model", scores.model)] + ([("majority", scores.majority)] if scores.majority is not None else [])
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        shift = (i - (len(bars) - 1) / 2) * width
        ax.bar([p + shift for p in places], [math.nan if v is None else v for v in values], width, label=label)
    ax.set_xticks(places, scores.names, rotation=30 if len(places) > 8 else 0)  # many names: tilted to fit
    ax.set(ylim=(0, 1), ylabel="F1", title="attribute extraction: F1 per attribute")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig: Any, path: Path) -> None:
    """The figure as a PNG of FIGSIZE × DPI pixels, then closed (pyplot keeps every open figure)."""
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "stage"
