"""Faults on 2 real gloo ranks: a rank SIGKILLed mid-stage, a save killed or failing, a NaN batch.

Each broken run is resumed and must end with the weights of the uninterrupted reference run (fp32 on CPU: bit-exact).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.launching import free_port, run_ranks
from mmtrain.train.checkpoint import COMPLETE, latest_complete
from mmtrain.train.heartbeat import HANG_EXIT_CODE
from mmtrain.train.safe_load import safe_torch_load

from train_helpers import metrics, stage, write_recipe

PROBE = str(Path(__file__).with_name("fault_probe.py"))
HANG_TIMEOUT = 30
STEPS = 6


def _recipe(tmp: Path, data) -> Path:
    return write_recipe(tmp / "recipe.yaml", data, [
        stage("pretrain", data, train={"vision": True, "connector": True, "llm": "full"}, optimizer={"lr": 2e-3},
              steps=STEPS, save_every=2)], faults={"hang_timeout_s": HANG_TIMEOUT})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "stages" / "pretrain" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def _resume(recipe: Path, out: Path, log: Path) -> None:
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(out), "--resume"], log=log, timeout=600)
    assert result.returncode == 0, log.read_text()[-3000:]
    assert "resuming from" in log.read_text()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    recipe = _recipe(tmp, tiny_data)
    out = tmp / "whole"
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(out)], log=tmp / "whole.log", timeout=600)
    assert result.returncode == 0, (tmp / "whole.log").read_text()[-3000:]
    return {"recipe": recipe, "weights": _weights(out), "losses": {m["step"]: m["loss"] for m in metrics(out)},
            "out": out}


def test_checkpoint_files_load_without_pickle_and_a_pickle_is_refused(reference, tmp_path: Path) -> None:
    files = sorted((reference["out"] / "checkpoints").glob("*/*.pt"))
    assert len(files) >= 4
    for path in files:
        assert isinstance(safe_torch_load(str(path)), dict)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"module": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match="evil.pt: refused"):
        safe_torch_load(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


def test_sigkill_of_rank_1_is_reported_by_rank_0_and_resume_matches(reference, tmp_path: Path) -> None:
    """Ranks started without a launcher (as srun starts them): nothing but mmtrain notices the dead peer."""
    out = tmp_path / "run"
    port = str(free_port())
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONUNBUFFERED": "1"}
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, "-m", "mmtrain.train", "--recipe", str(reference["recipe"]),
                                       "--out", str(out)], env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 300
        while latest_complete(out / "checkpoints") is None and time.time() < deadline and procs[0].poll() is None:
            time.sleep(0.05)
        assert latest_complete(out / "checkpoints") is not None, (tmp_path / "rank0.log").read_text()[-3000:]
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        code = procs[0].wait(timeout=HANG_TIMEOUT + 90)
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
        for f in logs:
            f.close()
    log = (tmp_path / "rank0.log").read_text()
    assert code == HANG_EXIT_CODE, log[-3000:]
    assert waited <= HANG_TIMEOUT + 60, waited
    print(f"rank 0 exited {waited:.1f} s after rank 1 was killed")
    report = (out / "hang-report.txt").read_text()
    assert "silent ranks: rank 1\n" in report, report
    assert "written by rank 0" in report and "Python stacks of rank 0" in report
    # DeepSpeed's CPU shared-memory buffers: unlinked at start-up, so not even a SIGKILL leaks them
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    beat = json.loads((out / "heartbeat" / "rank-1.json").read_text())
    assert beat["rank"] == 1 and beat["stage"] == "pretrain" and beat["step"] >= 2

    saved = latest_complete(out / "checkpoints")
    assert saved is not None and saved.step in (2, 4)
    _resume(reference["recipe"], out, tmp_path / "resume.log")
    _assert_same_weights(_weights(out), reference["weights"])


@pytest.mark.parametrize("fault", ["kill_in_save", "write_error"])
def test_a_save_that_dies_or_fails_is_never_complete_and_resume_takes_the_previous(reference, tmp_path, fault,
                                                                                    monkeypatch) -> None:
    out = tmp_path / "run"
    ranks = "0,1" if fault == "kill_in_save" else "1"  # a crashed node loses every rank; a full disk hits one
    monkeypatch.setenv("MMTRAIN_TEST_FAULT", f"{fault}:{ranks}:4")
    result = run_ranks(2, ["--recipe", str(reference["recipe"]), "--out", str(out)], log=tmp_path / "broken.log",
                       timeout=600, module=PROBE)
    log = (tmp_path / "broken.log").read_text()
    assert result.returncode != 0, log[-3000:]
    partial = out / "checkpoints" / "stage0-pretrain-step0000004"
    assert partial.is_dir() and not (partial / COMPLETE).exists()
    assert latest_complete(out / "checkpoints").step == 2
    if fault == "write_error":
        assert "rank(s) [1] could not write it" in log and "No space left on device" in log
        assert "stage0-pretrain-step0000002 (--resume starts there)" in log
    monkeypatch.delenv("MMTRAIN_TEST_FAULT")
    _resume(reference["recipe"], out, tmp_path / "resume.log")
    assert [m["step"] for m in metrics(out)][-STEPS + 2:] == list(range(3, STEPS + 1))
    assert [m["loss"] for m in metrics(out)][-STEPS + 2:] == [reference["losses"][s] for s in range(3, STEPS + 1)]
    _assert_same_weights(_weights(out), reference["weights"])


def test_a_nan_batch_is_skipped_counted_and_weights_stay_finite(reference, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv("MMTRAIN_TEST_FAULT", "nan:0:3")  # rank 0's third micro-batch: NaN pixels
    result = run_ranks(2, ["--recipe", str(reference["recipe"]), "--out", str(out)], log=tmp_path / "nan.log",
                       timeout=600, module=PROBE)
    assert result.returncode == 0, (tmp_path / "nan.log").read_text()[-3000:]
    records = metrics(out)
    assert [m["nonfinite_steps"] for m in records] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(records[2]["loss"])
    assert all(math.isfinite(m["loss"]) for i, m in enumerate(records) if i != 2)
    assert [m["loss"] for m in records[:2]] == [reference["losses"][1], reference["losses"][2]]
    assert records[2]["lr"] == records[1]["lr"] != records[3]["lr"]  # the skipped step did not move the schedule
    assert records[2]["grad_norm"] is None or not math.isfinite(records[2]["grad_norm"])
    weights = _weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    report = json.loads((out / "run-report.json").read_text())
    assert report["stages"][0]["nonfinite_steps"] == [3]
