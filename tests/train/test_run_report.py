"""`mmtrain report`: a run's metrics.jsonl (two stages, a resumed stretch logged twice) and an evaluation's
metrics.json → the series that are plotted, summary.json, and PNGs of the expected size."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmtrain.cli import main
from mmtrain.errors import UserError
from mmtrain.run_report import (ATTRIBUTE_CHART, AttributeScores, StageSeries, attribute_f1, attribute_figure,
                                find_files, pyplot, read_records, stage_figure, stage_series, stage_summary,
                                write_report)

A_LOSS = {1: 4.0, 2: 3.0, 3: 2.5, 4: 2.0, 5: 1.75, 6: 1.5, 7: 1.25, 8: 1.0}
A_RESUMED = {7: 1.125, 8: 0.75}  # the run resumed from a checkpoint at step 6: steps 7 and 8 are logged again


def rec(stage: str, step: int, loss: float) -> dict:
    return {"stage": stage, "stage_index": 0 if stage == "a" else 1, "step": step, "loss": loss,
            "lr": step / 1024, "grad_norm": 1.0, "samples": 4, "mfu": None, "skipped": {}}


RECORDS = ([rec("a", s, loss) for s, loss in A_LOSS.items()] + [rec("a", s, loss) for s, loss in A_RESUMED.items()]
           + [rec("b", s, loss) for s, loss in ((1, 0.5), (2, 0.25), (3, 0.125))])
RESULTS = {"model": {"attributes": {"micro": {"f1": 0.6}, "per_attribute": {
               "colour": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 10},
               "gender": {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 10},
               "season": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}}}},
           "blank_images": {"attributes": {"per_attribute": {"colour": {"f1": 0.125}}}},
           "majority": {"attributes": {"per_attribute": {"colour": {"f1": 0.25}, "gender": {"f1": 0.625}}}}}
A_STEPS = [1, 2, 3, 4, 5, 6, 7, 8]
A_LOSSES = [4.0, 3.0, 2.5, 2.0, 1.75, 1.5, 1.125, 0.75]
SUMMARY = [{"stage": "a", "steps": 8, "first_loss": 3.5, "last_loss": 0.9375},  # k = 8 // 4 = 2 steps each end
           {"stage": "b", "steps": 3, "first_loss": 0.5, "last_loss": 0.125}]  # k = 1
F1 = {"model": {"colour": 0.5, "gender": 0.75, "season": 0.0}, "majority": {"colour": 0.25, "gender": 0.625,
                                                                            "season": None}}


@pytest.fixture
def drawing() -> None:
    pytest.importorskip("matplotlib", reason="the report extra (pip install 'mmtrain[report]')")


def write_run(root: Path, with_eval: bool = True) -> Path:
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    if with_eval:
        (root / "eval").mkdir()
        (root / "eval" / "metrics.json").write_text(json.dumps(RESULTS))
    return root


def test_each_stage_s_series_takes_the_last_record_of_a_repeated_step(tmp_path) -> None:
    series = stage_series(read_records(write_run(tmp_path / "run") / "metrics.jsonl"))
    assert series == [StageSeries("a", 0, A_STEPS, A_LOSSES, [s / 1024 for s in A_STEPS]),
                      StageSeries("b", 1, [1, 2, 3], [0.5, 0.25, 0.125], [1 / 1024, 2 / 1024, 3 / 1024])]
    assert stage_summary(tmp_path / "run") == SUMMARY


def test_per_attribute_f1_of_the_model_and_the_majority() -> None:
    assert attribute_f1(RESULTS) == AttributeScores(["colour", "gender", "season"], [0.5, 0.75, 0.0],
                                                    [0.25, 0.625, None])
    assert attribute_f1({"model": RESULTS["model"]}) == AttributeScores(["colour", "gender", "season"],
                                                                        [0.5, 0.75, 0.0], None)
    assert attribute_f1({"model": {"attributes": {"per_key": {"colour": 0.5}}}}) is None  # no per-attribute F1
    assert attribute_f1({"model": {"category": {"leaf_acc": 0.5}}}) is None


def test_the_figures_plot_exactly_the_series(drawing) -> None:
    stage = StageSeries("a", 0, A_STEPS, A_LOSSES, [s / 1024 for s in A_STEPS])
    fig = stage_figure(stage)
    loss, lr = fig.axes
    assert loss.lines[0].get_xydata().tolist() == [[s, v] for s, v in zip(A_STEPS, A_LOSSES)]
    assert lr.lines[0].get_xydata().tolist() == [[s, s / 1024] for s in A_STEPS]
    assert (loss.get_title(), lr.get_title(), fig.get_suptitle()) == ("loss", "lr", "stage a: 8 steps")
    pyplot().close(fig)
    fig = attribute_figure(attribute_f1(RESULTS))
    [ax] = fig.axes
    model, majority = ax.containers
    assert [bar.get_height() for bar in model] == [0.5, 0.75, 0.0]
    heights = [bar.get_height() for bar in majority]
    assert heights[:2] == [0.25, 0.625] and math.isnan(heights[2])  # season: no majority score, no bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["colour", "gender", "season"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model", "majority"]
    pyplot().close(fig)


def pngs(paths: list[Path]) -> dict[str, tuple[str, tuple[int, int]]]:
    out = {}
    for path in paths:
        if path.suffix == ".png":
            with Image.open(path) as image:
                out[path.name] = (image.format, image.size)
    return out


def test_mmtrain_report_on_a_demo_directory_writes_the_pngs_and_summary(drawing, tmp_path, capsys) -> None:
    demo = tmp_path / "demo"
    demo.mkdir()
    write_run(demo / "run", with_eval=False)
    (demo / "eval").mkdir()
    (demo / "eval" / "metrics.json").write_text(json.dumps(RESULTS))
    assert main(["report", str(demo)]) == 0
    report = demo / "report"
    names = ["stage0-a.png", "stage1-b.png", ATTRIBUTE_CHART, "summary.json"]
    assert capsys.readouterr().out.splitlines() == [str(report / n) for n in names]
    assert pngs([report / n for n in names]) == {n: ("PNG", (1000, 400)) for n in names[:3]}
    assert json.loads((report / "summary.json").read_text()) == {
        "metrics": str(demo / "run" / "metrics.jsonl"), "stages": SUMMARY,
        "evaluation": str(demo / "eval" / "metrics.json"), "attribute_f1": F1}


def test_a_run_directory_without_an_evaluation_and_one_named_with_eval(drawing, tmp_path, capsys) -> None:
    run = write_run(tmp_path / "run", with_eval=False)
    assert main(["report", str(run), "--out", str(tmp_path / "pictures")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["no evaluation found (RUN_DIR/eval/metrics.json or --eval): loss and lr curves only",
                   *(str(tmp_path / "pictures" / n) for n in ("stage0-a.png", "stage1-b.png", "summary.json"))]
    assert json.loads((tmp_path / "pictures" / "summary.json").read_text()) == {
        "metrics": str(run / "metrics.jsonl"), "stages": SUMMARY}
    (tmp_path / "elsewhere.json").write_text(json.dumps({"model": RESULTS["model"]}))
    written = write_report(find_files(run, tmp_path / "elsewhere.json"))
    assert [p.name for p in written] == ["stage0-a.png", "stage1-b.png", ATTRIBUTE_CHART, "summary.json"]
    assert json.loads((run / "report" / "summary.json").read_text())["attribute_f1"] == {"model": F1["model"]}


def test_what_is_missing_is_named(tmp_path, monkeypatch, capsys) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == (f"mmtrain report: error: no metrics.jsonl in {tmp_path / 'nothing'} or "
                                       f"{tmp_path / 'nothing' / 'run'}: give a run directory (--out of a training "
                                       "run) or a demo directory\n")
    run = write_run(tmp_path / "run")
    broken = write_run(tmp_path / "broken", with_eval=False) / "metrics.jsonl"
    broken.write_text(broken.read_text() + '{"stage": "b", "st\n')  # a run killed mid-line
    with pytest.raises(UserError) as info:
        read_records(broken)
    assert str(info.value) == (f"{broken}:14: not a JSON record (Unterminated string starting at: line 1 column 16 "
                               "(char 15))")
    with pytest.raises(UserError, match=r"^--eval .*missing\.json does not exist$"):
        find_files(run, tmp_path / "missing.json")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    with pytest.raises(UserError) as info:
        write_report(find_files(run))
    assert str(info.value) == ("mmtrain report draws with matplotlib, which cannot be imported (import of "
                               "matplotlib halted; None in sys.modules): pip install 'mmtrain[report]'")
    assert not (run / "report").exists()
