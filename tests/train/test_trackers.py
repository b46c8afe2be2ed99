"""The recipe's trackers (`report_to`), driven through MetricsLogger with synthetic step records and read back with
each backend's own reader: wandb offline (`wandb leet inspect --json` over the run's `.wandb` file), mlflow from a file
store (`MlflowClient`), tensorboard's event files. The same scalars under the same names (mlflow: slashes after the
stage as dots) at the stage's step; a resume (the same run directory) logs to the same wandb / mlflow run. No network.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmtrain.config import recipe_from_dict
from mmtrain.config.recipe import TrackerName
from mmtrain.errors import UserError
from mmtrain.train.logging import MetricsLogger, metrics_logger, scalars_of
from mmtrain.train.trackers import TRACKERS, flat_params, mlflow_key

CONFIG = {"name": "r", "stages": [{"name": "a", "steps": 3}, {"name": "b", "steps": 2}], "seed": 0}


def record(stage: str, step: int) -> dict:
    """A step record shaped like stepping.py's."""
    return {"stage": stage, "stage_index": 0 if stage == "a" else 1, "step": step, "loss": 2.0 / step,
            "lr": 0.001 * step, "grad_norm": 1.5, "samples": 8, "samples_per_s": 40.0 + step, "tokens_per_s": 900.5,
            "tflops": 0.25, "mfu": None, "samples_read": 8 * step, "skipped": {}, "nonfinite_steps": 0,
            "lr/llm/no_decay": 0.001 * step}


def log_steps(logger: MetricsLogger, steps: list[tuple[str, int]]) -> None:
    for stage, step in steps:
        logger.log(record(stage, step), step)
    logger.close()


FIRST_RUN = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    return monkeypatch


def test_the_trackers_are_the_recipe_s_choices_and_get_the_numbers_of_a_record() -> None:
    assert TRACKERS == TrackerName.__args__ == ("tensorboard", "wandb", "mlflow")
    assert scalars_of(record("a", 2)) == {
        "a/loss": 1.0, "a/lr": 0.002, "a/grad_norm": 1.5, "a/samples": 8, "a/samples_per_s": 42.0,
        "a/tokens_per_s": 900.5, "a/tflops": 0.25, "a/samples_read": 16, "a/nonfinite_steps": 0,
        "a/lr/llm/no_decay": 0.002}
    assert flat_params({"name": "r", "stages": [{"lr": 1e-05, "data": []}], "model": {"config": {}, "init": None},
                        "compile": False}) == {
        "name": "r", "stages.0.lr": "1e-05", "stages.0.data": "[]", "model.config": "{}", "model.init": "null",
        "compile": "false"}


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of an offline run's `.wandb` file, read by wandb's own reader."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def history(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in records if r["type"] == "history"]


def test_wandb_offline_gets_each_stage_on_its_own_step_and_a_resume_continues_the_run(clean_env, tmp_path) -> None:
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'mmtrain[wandb]')")
    out = tmp_path / "run-7"
    log_steps(MetricsLogger(out, 0, ["wandb"], CONFIG), FIRST_RUN)
    ids = json.loads((out / "trackers.json").read_text())
    [first] = sorted((out / "wandb").glob("offline-run-*"))  # no WANDB_DIR: inside the run directory
    records = wandb_records(first)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["run_id"], run["display_name"], run["project"]) == (ids["wandb"]["id"], "run-7", "mmtrain")
    assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == CONFIG
    rows = history(records)
    assert [(r["stage"], r[f"{r['stage']}/step"], r[f"{r['stage']}/loss"], r[f"{r['stage']}/lr"]) for r in rows] \
        == [("a", 1, 2.0, 0.001), ("a", 2, 1.0, 0.002), ("a", 3, 2.0 / 3, 0.003), ("b", 1, 2.0, 0.001),
            ("b", 2, 1.0, 0.002)]
    assert rows[3] == {"stage": "b", "b/step": 1, **scalars_of(record("b", 1))}
    steps = {r["metric"].get("glob_name"): r["metric"].get("step_metric") for r in records if r["type"] == "metric"}
    assert steps == {None: None, "a/*": "a/step", "b/*": "b/step"}  # each stage plotted against its own step

    # resumed from stage b's step 1: the same run id, step 2 logged again and step 3 after it
    log_steps(MetricsLogger(out, 0, ["wandb"], CONFIG), [("b", 2), ("b", 3)])
    second = [d for d in sorted((out / "wandb").glob("offline-run-*")) if d != first]
    assert len(second) == 1 and second[0].name.endswith(ids["wandb"]["id"])
    assert json.loads((out / "trackers.json").read_text()) == ids
    assert [(r["b/step"], r["b/loss"]) for r in history(wandb_records(second[0]))] == [(2, 1.0), (3, 2.0 / 3)]


def test_wandb_keeps_to_the_standard_environment_variables(clean_env, tmp_path) -> None:
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'mmtrain[wandb]')")
    clean_env.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    clean_env.setenv("WANDB_PROJECT", "catalog-vlm")
    out = tmp_path / "run"
    log_steps(MetricsLogger(out, 0, ["wandb"], CONFIG), [("a", 1)])
    assert not (out / "wandb").exists()
    [run_dir] = (tmp_path / "elsewhere" / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    assert next(r["run"]["project"] for r in records if r["type"] == "run") == "catalog-vlm"
    assert history(records)[0]["a/loss"] == 2.0


def mlflow_client() -> type:
    """mlflow's client class; the test is skipped where the extra is not installed."""
    tracking = pytest.importorskip("mlflow.tracking", reason="the mlflow extra (pip install 'mmtrain[mlflow]')")
    return tracking.MlflowClient


def test_mlflow_file_store_gets_the_same_scalars_and_a_resume_continues_the_run(clean_env, tmp_path) -> None:
    client_class = mlflow_client()

    uri = (tmp_path / "store").as_uri()
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "products")
    out = tmp_path / "run-3"
    log_steps(MetricsLogger(out, 0, ["mlflow"], CONFIG), FIRST_RUN)
    ids = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = client_class(tracking_uri=uri)
    run = client.get_run(ids["run_id"])
    assert ids["tracking_uri"] == uri
    assert (run.info.run_name, run.info.status, run.data.tags["stage"]) == ("run-3", "FINISHED", "b")
    assert client.get_experiment(run.info.experiment_id).name == "products"
    assert run.data.params == flat_params(CONFIG) == {"name": "r", "stages.0.name": "a", "stages.0.steps": "3",
                                                      "stages.1.name": "b", "stages.1.steps": "2", "seed": "0"}
    assert set(run.data.metrics) == {mlflow_key(k) for k in scalars_of(record("a", 1)) | scalars_of(record("b", 1))}
    assert mlflow_key("a/lr/llm/no_decay") == "a/lr.llm.no_decay" and mlflow_key("a/loss") == "a/loss"

    def points(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(ids["run_id"], key))

    assert points("a/loss") == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert points("a/lr.llm.no_decay") == [(1, 0.001), (2, 0.002), (3, 0.003)]
    assert points("b/samples_per_s") == [(1, 41.0), (2, 42.0)]

    log_steps(MetricsLogger(out, 0, ["mlflow"], CONFIG), [("b", 3)])
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == ids
    assert points("b/loss") == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert client.get_run(ids["run_id"]).info.status == "FINISHED"


def test_mlflow_without_a_tracking_uri_keeps_its_store_in_the_run_directory(clean_env, tmp_path) -> None:
    client_class = mlflow_client()

    out = tmp_path / "run"
    log_steps(MetricsLogger(out, 0, ["mlflow"], CONFIG), [("a", 1)])
    ids = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == (out / "mlruns").as_uri()
    client = client_class(tracking_uri=ids["tracking_uri"])
    assert [(m.step, m.value) for m in client.get_metric_history(ids["run_id"], "a/loss")] == [(1, 2.0)]
    assert client.get_experiment(client.get_run(ids["run_id"]).info.experiment_id).name == "mmtrain"


def test_tensorboard_gets_the_same_names(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    log_steps(MetricsLogger(out, 0, ["tensorboard"]), FIRST_RUN)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == set(scalars_of(record("a", 1))) | set(scalars_of(record("b", 1)))
    assert [(e.step, e.value) for e in events.Scalars("b/loss")] == [(1, 2.0), (2, 1.0)]


def test_the_recipe_s_report_to_reaches_the_logger(clean_env, tmp_path) -> None:
    client_class = mlflow_client()
    stages = [{"name": "a", "data": ["x"]}]
    recipe = recipe_from_dict({"name": "r", "report_to": ["mlflow"], "stages": stages})
    logger = metrics_logger(recipe, tmp_path / "run", 0)
    assert [type(t).__name__ for t in logger.trackers] == ["MlflowTracker"]
    run_id = logger.trackers[0].run_id
    logger.close()
    params = client_class(tracking_uri=(tmp_path / "run" / "mlruns").as_uri()).get_run(run_id).data.params
    assert params == flat_params(recipe.to_dict()) and params["report_to.0"] == "mlflow"
    default = recipe_from_dict({"name": "r", "stages": stages})
    assert default.report_to == ["tensorboard"]
    assert metrics_logger(default, tmp_path / "quiet", 0, tensorboard=False).trackers == []  # RunOptions' switch
    assert metrics_logger(recipe, tmp_path / "rank1", 1).trackers == []  # rank 0 only
    assert not (tmp_path / "rank1").exists()


def test_a_missing_extra_is_named_on_every_rank_before_anything_runs(monkeypatch, tmp_path) -> None:
    # an unknown name never gets here: the recipe refuses it (tests/train/test_config_tree.py)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    for rank in (0, 1):  # every rank checks, so no rank goes on to build the stage
        with pytest.raises(UserError) as info:
            MetricsLogger(tmp_path / "run", rank, ["tensorboard", "wandb"])
        assert str(info.value) == ("report_to names wandb, but wandb cannot be imported (import of wandb halted; None "
                                   "in sys.modules): pip install 'mmtrain[wandb]'")
    assert not (tmp_path / "run").exists()
