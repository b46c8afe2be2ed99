"""launch/slurm/*.sbatch on a real one-node SLURM (2 CPUs): training runs to the end, USR1 → save → requeue → exact
resume, and shard building as an array job + merge."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from mmtrain.data.shards.writer import read_manifest
from mmtrain.launching import free_port
from mmtrain.train.checkpoint import list_complete

from slurm_helpers import SlurmCluster
from train_helpers import metrics, stage, write_recipe

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "slurm" / "train.sbatch"
SHARDS = REPO / "launch" / "slurm" / "shards.sbatch"
STEPS = 8
# The template asks for GPU nodes of a `gpu` partition; on this test cluster: the one 2-CPU node, 2 CPU ranks.
HERE_OPTIONS = ("--partition=debug", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10")


@pytest.fixture(scope="module")
def recipe(launch_data, tmp_path_factory) -> Path:
    """8 steps, no periodic checkpoint: the only checkpoints are the final one and the one USR1 asks for. One
    DataLoader worker per rank, as the trainer's default: SLURM signals it too (it must not die of USR1)."""
    return write_recipe(tmp_path_factory.mktemp("slurm-train") / "recipe.yaml", launch_data, [
        stage("pretrain", launch_data, train={"vision": True, "connector": True, "llm": "full"},
              optimizer={"lr": 2e-3}, steps=STEPS, save_every=0,
              loader={"num_workers": 1, "mode": "resampled", "samples_per_epoch": 4000, "shuffle_buffer": 50}),
    ])


def submit_train(slurm: SlurmCluster, recipe: Path, out: Path) -> int:
    env = {"RECIPE": str(recipe), "OUT": str(out), "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return slurm.sbatch(TRAIN, *HERE_OPTIONS, f"--chdir={REPO}", f"--output={out.parent}/slurm-%j.out", env=env)


def job_log(out: Path, job: int) -> str:
    path = out / "logs" / f"job-{job}.log"
    return path.read_text(errors="replace") if path.is_file() else "(no log)"


@pytest.fixture(scope="module")
def whole_run(slurm: SlurmCluster, recipe: Path, tmp_path_factory) -> tuple[Path, int, dict[str, str]]:
    out = tmp_path_factory.mktemp("slurm-whole") / "run"
    job = submit_train(slurm, recipe, out)
    info = slurm.wait(job, timeout=150)
    return out, job, info


def test_train_sbatch_runs_to_the_end(whole_run) -> None:
    out, job, info = whole_run
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, job_log(out, job))
    assert info["Restarts"] == "0"
    log = job_log(out, job)
    assert "no complete checkpoint" in log and "=== finished" in log and "requeueing" not in log, log
    assert [(c.stage, c.step) for c in list_complete(out / "checkpoints")] == [("pretrain", STEPS)]
    assert (out / "stages" / "pretrain" / "complete.json").is_file()
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [(s["start_step"], s["world_size"]) for s in stages] == [(0, 2)]


def test_usr1_saves_requeues_and_resumes_exactly(slurm: SlurmCluster, recipe: Path, whole_run,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = submit_train(slurm, recipe, out)
    # stages.jsonl is written once every rank has built its engine (handlers installed), right before step 1.
    deadline = time.time() + 120
    while not (out / "stages.jsonl").is_file():
        info = slurm.job(job)
        assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), (info, job_log(out, job))
        assert time.time() < deadline, f"training did not start in 120 s: {job_log(out, job)}"
        time.sleep(0.05)
    # As `#SBATCH --signal=USR1@120` does before the time limit: USR1 to the job's steps (srun → torchrun → ranks).
    slurm.run("scancel", "--signal=USR1", str(job))
    info = slurm.wait(job, timeout=150)
    log = job_log(out, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert info["Restarts"] == "1", (info, log)

    saved = re.search(r"preempted: checkpoint at stage pretrain step (\d+) saved", log)
    assert saved, f"no preemption save (did the signal arrive after the last step?):\n{log}"
    at = int(saved.group(1))
    assert 0 < at < STEPS
    assert f"requeueing job {job}" in log and "restart 1" in log
    assert f"resuming from {out / 'checkpoints'}/stage0-pretrain-step{at:07d} (stage pretrain, step {at})" in log
    assert [(c.stage, c.step) for c in list_complete(out / "checkpoints")] == [("pretrain", at), ("pretrain", STEPS)]
    # Steps continue where the save was (no step twice, none missing); the resumed start is at the saved step.
    steps = metrics(out)
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in stages] == [0, at]
    # ... and exactly: the same losses as the run that was never interrupted (fp32 on CPU: bit for bit).
    assert [m["loss"] for m in steps] == [m["loss"] for m in metrics(whole_run[0])]
    assert (out / "stages" / "pretrain" / "complete.json").is_file()


def _samples(folder: Path, split: str) -> dict[str, bytes]:
    out = {}
    for shard in read_manifest(folder)["splits"][split]["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar})
    return out


def test_shards_array_job_then_merge(slurm: SlurmCluster, launch_data, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    env = {**slurm.env, "SPEC": str(REPO / "shards" / "catalogs" / "fashion-products.yaml"),
           "CATALOG": str(launch_data["catalog"]), "IMAGES": str(launch_data["images"]), "OUT": str(out),
           "PARTS": "2", "BUILD_ARGS": "--image-size 48 --shard-size 40"}
    res = subprocess.run(["bash", str(SHARDS), "--partition=debug", "--cpus-per-task=1", "--time=10"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    array, merge = map(int, re.search(r"array job (\d+) .* merge job (\d+)", res.stdout).groups())
    merged = slurm.wait(merge, timeout=120)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "merged.parts" / "logs").glob("*.out")))
    assert merged["JobState"] == "COMPLETED", (merged, logs)
    for task in (0, 1):
        assert slurm.job(f"{array}_{task}").get("JobState") == "COMPLETED", logs
    assert "part 0 of 2: 24 of 48 records" in logs and "part 1 of 2: 24 of 48 records" in logs
    # One manifest, the same samples (byte for byte) as the one-process build of the same 48 rows.
    manifest, reference = read_manifest(out), read_manifest(launch_data["mm"])
    assert manifest["rows"] == reference["rows"] == 48
    for split in ("train", "val"):
        for field in ("samples", "images", "products", "tasks"):
            assert manifest["splits"][split][field] == reference["splits"][split][field]
        names = [s["name"] for s in manifest["splits"][split]["shards"]]
        assert len(names) == len(set(names))
        assert _samples(out, split) == _samples(launch_data["mm"], split)
    assert not list((tmp_path / "merged.parts").glob("part-*"))  # parts removed after the merge (KEEP_PARTS=0)
