"""SIGUSR1 (SLURM's warning before preemption) or SIGTERM to the ranks: save a complete checkpoint, exit 0, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mmtrain.launching import deepspeed_command, run_ranks
from mmtrain.train.checkpoint import latest_complete

from train_helpers import metrics, stage, write_recipe


def _rank_pids(out: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mmtrain.train" in cmdline and str(out).encode() in cmdline and any(
                    a.startswith(b"--local_rank") for a in cmdline):
                pids.append(int(entry))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_saves_a_complete_checkpoint_and_resume_continues(tiny_data, tmp_path: Path, sig) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, [
        stage("pretrain", tiny_data, train={"vision": True, "connector": True, "llm": "full"}, steps=12)])
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(deepspeed_command(2, ["--recipe", str(recipe), "--out", str(out)]), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        pids = _rank_pids(out)
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, sig)
        assert proc.wait(timeout=180) == 0, (tmp_path / "run.log").read_text()[-3000:]
    saved = latest_complete(out / "checkpoints")
    steps = [m["step"] for m in metrics(out)]
    assert saved is not None and saved.step == steps[-1] < 12
    assert not (out / "stages" / "pretrain").exists()
    assert "preempted" in (tmp_path / "run.log").read_text()

    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(out), "--resume"], log=tmp_path / "resume.log",
                       timeout=300)
    assert result.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    events = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [e["start_step"] for e in events] == [0, saved.step]
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))
    assert (out / "stages" / "pretrain" / "complete.json").is_file()
