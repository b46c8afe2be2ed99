"""Where rank 0's step scalars go besides `metrics.jsonl`: tensorboard, Weights & Biases, MLflow (`report_to`).

Every backend is one class with the same three calls (`stage`, `log`, `close`), and MetricsLogger hands each the same
scalars under the same names (`<stage>/<key>`, tensorboard's tags) at the stage's step. wandb and mlflow are optional
extras, imported only when the recipe names them; their standard environment variables (WANDB_MODE, WANDB_PROJECT,
WANDB_DIR, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, …) win over the defaults here, which keep everything inside
the run directory. The ids of a run's wandb and mlflow runs are kept in `RUN/trackers.json`, so a resumed run (the
same run directory) goes on logging to the same runs.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol, get_args
from urllib.parse import urlparse

from mmtrain.config.recipe import TrackerName
from mmtrain.errors import UserError

TRACKERS: tuple[str, ...] = get_args(TrackerName)
"""Every name `report_to` takes."""
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}
"""Tracker → the module it needs, installed by the extra of the same name (pip install 'mmtrain[NAME]')."""
IDS_FILE = "trackers.json"
"""In the run directory: {"wandb": {"id"}, "mlflow": {"run_id", "tracking_uri"}}, so a resume logs to the same runs."""
PROJECT = "mmtrain"
"""The wandb project and mlflow experiment when WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME / _ID say nothing."""


class Tracker(Protocol):
    """One backend: told the stage when it changes, then the step's scalars, then closed once."""

    def stage(self, name: str) -> None: ...

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def require(names: list[str] | tuple[str, ...]) -> None:
    """A UserError naming the extra to install when a named tracker's package cannot be imported (run on every rank
    at start-up, before anything is built, so no rank trains when one tracker cannot start)."""
    for name in names:
        module = EXTRAS.get(name)
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"report_to names {name}, but {module} cannot be imported ({exc}): "
                            f"pip install 'mmtrain[{name}]'") from None


def open_trackers(names: list[str] | tuple[str, ...], out: Path, config: dict[str, Any]) -> list[Tracker]:
    """The named trackers for the run directory `out` (its name is the run's name), `config` logged once per run."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"unknown trackers {unknown} (known: {', '.join(TRACKERS)})")
    require(names)
    ids_path = out / IDS_FILE
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.is_file() else {}
    makers: dict[str, Callable[[], Tracker]] = {
        "tensorboard": lambda: TensorboardTracker(out),
        "wandb": lambda: WandbTracker(out, config, ids),
        "mlflow": lambda: MlflowTracker(out, config, ids)}
    opened = [makers[name]() for name in names]
    if ids:
        ids_path.write_text(json.dumps(ids, indent=1) + "\n", encoding="utf-8")
    return opened


def run_name(out: Path) -> str:
    """The run's name in every tracker: the run directory's own name (`runs/owl-a` → `owl-a`)."""
    return out.resolve().name


class TensorboardTracker:
    """Event files under `RUN/tensorboard` (tag = the scalar's name, step = the stage's step)."""

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: ~0.2 s, only for runs that log to it

        self._writer = SummaryWriter(str(out / "tensorboard"))

    def stage(self, name: str) -> None:
        pass

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """One wandb run per run directory. Every stage's scalars are plotted against its own `<stage>/step` (a wandb
    run's own step only grows, and each stage counts from 1); `stage` names the stage on every row."""

    def __init__(self, out: Path, config: dict[str, Any], ids: dict[str, Any]) -> None:
        import wandb  # optional extra: only runs that report to wandb load it

        # wandb reads its environment once per process; read here, these follow it at every run start
        env = os.environ
        stored = ids.get("wandb", {}).get("id")
        run_id = env.get("WANDB_RUN_ID") or stored
        directory = Path(env.get("WANDB_DIR") or out)
        directory.mkdir(parents=True, exist_ok=True)  # wandb falls back to the CWD when the directory is missing
        try:
            self._run = wandb.init(project=env.get("WANDB_PROJECT") or PROJECT,
                                   name=env.get("WANDB_NAME") or run_name(out), dir=str(directory), id=run_id,
                                   resume="allow" if run_id else None,
                                   config=None if stored and run_id == stored else config)  # once per run
        except wandb.errors.Error as exc:
            raise UserError(f"wandb could not start a run: {exc} (WANDB_MODE=offline logs without a network or a "
                            "login)") from None
        ids["wandb"] = {"id": self._run.id}
        self._stage = ""

    def stage(self, name: str) -> None:
        self._stage = name
        self._run.define_metric(f"{name}/step")
        self._run.define_metric(f"{name}/*", step_metric=f"{name}/step")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log({**scalars, f"{self._stage}/step": step, "stage": self._stage})

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """One mlflow run per run directory, through `MlflowClient` (no process-wide active run): the recipe as flat
    params when the run is created, the scalars as metrics at the stage's step (names as `mlflow_key` spells them),
    the current stage as tag `stage`. Without MLFLOW_TRACKING_URI the store is `RUN/mlruns` (a file store, which
    mlflow-skinny writes)."""

    def __init__(self, out: Path, config: dict[str, Any], ids: dict[str, Any]) -> None:
        # optional extra: only runs that report to mlflow load it
        from mlflow.environment_variables import MLFLOW_TRACKING_URI
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = MLFLOW_TRACKING_URI.get() if MLFLOW_TRACKING_URI.defined else (out / "mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store without it
        self._client = MlflowClient(tracking_uri=uri)
        try:
            self.run_id = self._start(out, config, ids.get("mlflow", {}), uri)
        except MlflowException as exc:
            raise UserError(f"mlflow could not start a run at {uri}: {exc}") from None
        ids["mlflow"] = {"run_id": self.run_id, "tracking_uri": uri}

    def _start(self, out: Path, config: dict[str, Any], stored: dict[str, Any], uri: str) -> str:
        """The stored run when the store still has it (a resume), else a new run with the recipe as its params."""
        # optional extra, imported by __init__ already
        from mlflow.entities import Param
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
        from mlflow.exceptions import MlflowException

        client = self._client
        if stored.get("tracking_uri") == uri:
            try:
                run_id = client.get_run(stored["run_id"]).info.run_id
                client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException:
                pass  # gone from the store: a new run
        if MLFLOW_EXPERIMENT_ID.defined:
            experiment_id = MLFLOW_EXPERIMENT_ID.get()
        else:
            name = MLFLOW_EXPERIMENT_NAME.get() or PROJECT
            found = client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else client.create_experiment(name)
        run_id = client.create_run(experiment_id, run_name=run_name(out)).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(config).items()])
        return run_id

    def stage(self, name: str) -> None:
        self._client.set_tag(self.run_id, "stage", name)

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # optional extra, imported by __init__ already

        stamp = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), float(v), stamp, step)
                                                     for k, v in scalars.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id, "FINISHED")


def mlflow_key(name: str) -> str:
    """`<stage>/<key>` with the key's own slashes as dots (`a/lr/llm/no_decay` → `a/lr.llm.no_decay`): a file store
    keeps a metric as a file under its name's folders, so `a/lr` and `a/lr/llm` could not both exist."""
    stage, _, key = name.partition("/")
    return f"{stage}/{key.replace('/', '.')}"


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as {"dotted.path": "value"} (list items by index): mlflow params are flat strings."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: json.dumps(value) if value is None or isinstance(value, bool) else str(value)}
    out: dict[str, str] = {}
    for key, item in items:
        out.update(flat_params(item, f"{prefix}.{key}" if prefix else str(key)))
    if not out and prefix:
        out[prefix] = "[]" if isinstance(value, (list, tuple)) else "{}"
    return out
