"""The fault machinery in-process: the watchdog's report, the non-finite guard, checkpoint pruning, and the
trainer refusing to start on a failed pre-flight check."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import pytest

from mmtrain.launching import run_ranks
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.guards import NonFiniteGuard, NonFiniteStop
from mmtrain.train.heartbeat import HANG_EXIT_CODE, Heartbeat, behind_ranks, read_heartbeats, silent_ranks

from train_helpers import stage, write_recipe


def test_watchdog_reports_no_progress_and_names_the_silent_rank(tmp_path: Path) -> None:
    # rank 1 of 3 died long ago (its pid is gone), rank 2 is alive but stuck one step behind
    (tmp_path / "heartbeat").mkdir()
    now = time.time()
    dead = {"rank": 1, "pid": 2 ** 22 + 12345, "host": os.uname().nodename, "stage": "pretrain", "stage_index": 1,
            "step": 7, "phase": "forward", "phase_since": now - 100, "alive": now - 100, "batch": None}
    (tmp_path / "heartbeat" / "rank-1.json").write_text(json.dumps(dead))
    exits = []
    beat = Heartbeat(tmp_path, rank=0, world_size=2, hang_timeout_s=1.0, on_hang=exits.append)
    beat.phase("forward", stage="pretrain", stage_index=1, step=8,
               batch={"image_samples": 3, "text_samples": 1, "tokens": 420, "wall_s": 0.1})
    deadline = time.time() + 20
    while not exits and time.time() < deadline:
        time.sleep(0.1)
    assert exits == [HANG_EXIT_CODE]
    report = (tmp_path / "hang-report.txt").read_text()
    assert "made no progress" in report and "phase 'forward' of step 8" in report
    assert "silent ranks: rank 1\n" in report and "is gone" in report
    assert "rank 0: stage pretrain step 8 phase forward" in report and '"tokens": 420' in report
    assert "Python stacks of rank 0" in report and "in _watch" in report


def test_silent_ranks_by_stale_stamp_on_another_host() -> None:
    now = 1000.0
    beats = {0: {"rank": 0, "pid": 1, "host": "other-node", "alive": now - 2},
             1: {"rank": 1, "pid": 1, "host": "other-node", "alive": now - 50}}
    found = silent_ranks(beats, world_size=3, stale_after=10, now=now)
    assert set(found) == {1, 2}
    assert "no heartbeat for 50 s" in found[1] and found[2] == "never wrote a heartbeat"


def test_a_rank_stuck_loading_data_is_named_behind() -> None:
    beats = {0: {"stage_index": 1, "step": 5, "phase": "forward"}, 1: {"stage_index": 1, "step": 5, "phase": "data"},
             2: {"stage_index": 1, "step": 5, "phase": "forward"}}
    assert behind_ranks(beats) == [1]
    beats[1]["phase"] = "forward"
    assert behind_ranks(beats) == []


def test_heartbeat_file_is_whole_json_after_close(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path, rank=3, world_size=4, hang_timeout_s=60)
    beat.phase("data", stage="lm", stage_index=0, step=1)
    beat.close()
    assert read_heartbeats(tmp_path)[3]["phase"] == "done"


def test_a_failed_ranks_report_carries_its_traceback(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path, rank=1, world_size=1, hang_timeout_s=60)
    try:
        raise AttributeError("'LlamaAttention' object has no attribute '_kernel_funcs'")
    except AttributeError:
        beat.report("rank 1 failed: AttributeError", failure=traceback.format_exc())
    beat.close()
    report = (tmp_path / "hang-report-rank-1.txt").read_text()
    head, rest = report.split("\nTraceback of the failure on rank 1:\nTraceback (most recent call last):\n")
    assert head.startswith("mmtrain hang report, written by rank 1")
    assert "in test_a_failed_ranks_report_carries_its_traceback" in rest.split("Python stacks of rank 1")[0]
    assert "AttributeError: 'LlamaAttention' object has no attribute '_kernel_funcs'\n" in rest


def test_nonfinite_guard_skips_then_stops_after_k_in_a_row() -> None:
    guard = NonFiniteGuard("skip", max_in_row=2)
    assert guard.check("s", 1, 2.0, 1.0, False, ["a"], 0) is False
    assert guard.check("s", 2, float("nan"), float("inf"), True, ["b"], 0) is True
    assert guard.check("s", 3, 1.5, 0.7, False, ["c"], 0) is False  # the run of non-finite steps resets
    assert guard.check("s", 4, float("inf"), None, True, ["d"], 0) is True
    with pytest.raises(NonFiniteStop, match=r"step 5.*2 non-finite steps in a row \(steps \[4, 5\]"):
        guard.check("s", 5, 1.0, float("nan"), True, ["k1", "k2"], 0)
    assert guard.total == 3 and guard.steps == [2, 4, 5]


def test_nonfinite_guard_policies() -> None:
    with pytest.raises(NonFiniteStop, match="faults.on_nonfinite: stop"):
        NonFiniteGuard("stop").check("s", 1, float("nan"), None, True, ["x"], 0)
    with pytest.raises(NonFiniteStop, match="weights cannot be trusted"):
        NonFiniteGuard("skip").check("s", 1, float("nan"), None, False, ["x"], 0)
    assert NonFiniteGuard("skip").check("s", 1, 3.0, float("inf"), True, [], 0, loss_scaling=True) is False


def _fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    folder = root / ckpt.checkpoint_tag(0, "s", step)
    folder.mkdir(parents=True)
    (folder / "model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.write_json_atomic(folder / ckpt.COMPLETE, {"stage_index": 0, "stage": "s", "step": step, "world_size": 1})
    return folder


def test_prune_keeps_the_newest_complete_and_removes_interrupted_saves(tmp_path: Path) -> None:
    for step, complete in [(2, True), (4, True), (6, False), (8, True), (10, False)]:
        _fake_checkpoint(tmp_path, step, complete)
    assert ckpt.prune(tmp_path, 0) == []
    removed = ckpt.prune(tmp_path, 2)
    assert sorted(p.name[-2:] for p in removed) == ["02", "06", "10"]
    assert [r.step for r in ckpt.list_complete(tmp_path)] == [4, 8]
    ckpt.clear_mark(tmp_path / ckpt.checkpoint_tag(0, "s", 8))
    assert ckpt.latest_complete(tmp_path).step == 4
    assert [r.step for r in ckpt.list_complete(tmp_path)] == [4]
    assert ckpt.prune(tmp_path, 1) and [r.step for r in ckpt.list_complete(tmp_path)] == [4]


def test_trainer_refuses_to_start_on_a_failed_preflight(tiny_data, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, [stage("s", tiny_data, max_length=16)])
    result = run_ranks(1, ["--recipe", str(recipe), "--out", str(tmp_path / "run")], log=tmp_path / "run.log",
                       timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert result.returncode != 0
    assert "sequence length   FAIL" in log and "pre-flight checks failed" in log, log[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    assert not list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))  # a single rank leaks none either
