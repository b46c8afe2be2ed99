"""Exact resume: SIGKILL both ranks after a checkpoint, `--resume`, and the losses and weights match bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmtrain.launching import deepspeed_command, run_ranks
from mmtrain.train.checkpoint import latest_complete

from train_helpers import metrics, stage, write_recipe


def _recipe(tmp: Path, data) -> Path:
    return write_recipe(tmp / "recipe.yaml", data, [
        stage("pretrain", data, train={"vision": True, "connector": True, "llm": "full"}, optimizer={"lr": 2e-3},
              steps=8, save_every=2,
              data=[{"shards": str(data["mm"]), "weight": 0.6}, {"shards": str(data["text"]), "weight": 0.4}]),
    ])


def test_sigkill_then_resume_continues_bit_exactly(tiny_data, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_data)
    whole = tmp_path / "whole"
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(whole)], log=tmp_path / "whole.log", timeout=600)
    assert result.returncode == 0, (tmp_path / "whole.log").read_text()[-3000:]

    broken = tmp_path / "broken"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "broken.log", "w") as log:
        proc = subprocess.Popen(deepspeed_command(2, ["--recipe", str(recipe), "--out", str(broken)]), env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while latest_complete(broken / "checkpoints") is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
        proc.wait()
    killed_at = latest_complete(broken / "checkpoints")
    assert killed_at is not None and killed_at.step < 8, "the run was not interrupted before its end"
    assert not (broken / "stages" / "pretrain").exists()

    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(broken), "--resume"], log=tmp_path / "resume.log",
                       timeout=600)
    assert result.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "resume.log").read_text()

    reference = {m["step"]: m["loss"] for m in metrics(whole)}
    resumed = [m for m in metrics(broken) if m["step"] > killed_at.step][-(8 - killed_at.step):]
    assert [m["step"] for m in resumed] == list(range(killed_at.step + 1, 9))
    assert [m["loss"] for m in resumed] == [reference[m["step"]] for m in resumed]  # fp32 on CPU: bit-exact
    a = load_file(str(whole / "stages" / "pretrain" / "model.safetensors"))
    b = load_file(str(broken / "stages" / "pretrain" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
