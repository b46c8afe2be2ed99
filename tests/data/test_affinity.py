"""Opt-in worker pinning: which core each worker takes, and a real DataLoader worker pinned there."""

import json
import os

import pytest
from loader_fixtures import tiny_tokenizer
from test_handoff import shards  # noqa: F401  (the module-scoped shard set)
from test_stream import assert_same_batches, config

from mmtrain.data.loader import cpu_affinity, stream
from mmtrain.data.loader.cpu_affinity import local_rank, local_world_size, worker_core
from mmtrain.data.loader.stream import build_loader


def test_cores_come_from_the_end_of_the_set_one_per_worker_and_rank():
    assert worker_core({0, 1}, 0, 1, 0) == 1  # this VM: the main process keeps core 0 to itself
    assert [worker_core({0, 1}, 0, 2, w) for w in range(2)] == [1, 0]
    shared = range(8)  # two ranks sharing one unbound set: four different cores
    assert [worker_core(shared, r, 2, w) for r in range(2) for w in range(2)] == [7, 6, 5, 4]
    own = {4, 5, 6, 7}  # rank 1 bound to its own set stays inside it
    assert [worker_core(own, 1, 2, w) for w in range(2)] == [5, 4]
    assert [worker_core({2, 9, 5}, 0, 4, w) for w in range(4)] == [9, 5, 2, 9]  # more workers than cores: wraps
    assert worker_core({3}, 0, 1, 0) is None


def clear_launcher_env(monkeypatch):
    for name in cpu_affinity.LOCAL_RANK_VARS + cpu_affinity.LOCAL_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)


def test_local_rank_and_size_from_the_launcher(monkeypatch):
    clear_launcher_env(monkeypatch)
    assert local_rank() is None and local_world_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", " 1\n")
    assert local_rank() == 1
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert local_rank() == 2
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert local_rank() == 3 and local_world_size() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert local_world_size() == 8


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_pinning_steps_aside_rather_than_guess_or_fail(monkeypatch):
    """Several ranks and no local rank known: every rank would take the same core, so none is pinned. A refused
    sched_setaffinity leaves the worker unpinned with a warning instead of killing the epoch."""
    clear_launcher_env(monkeypatch)
    calls = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: calls.append(cores))
    with pytest.warns(RuntimeWarning, match="4 ranks but no local rank"):
        assert cpu_affinity.pin_worker(0, 1, world_size=4) is None
    assert calls == []
    assert cpu_affinity.pin_worker(0, 2, world_size=1) == 3 and calls == [{3}]  # one rank: local rank 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cpu_affinity.pin_worker(1, 2, world_size=4) == 0 and calls[-1] == {0}

    def refuse(pid, cores):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    with pytest.warns(RuntimeWarning, match="could not pin worker 0 to core 1"):
        assert cpu_affinity.pin_worker(0, 2, world_size=4) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs sched_setaffinity and two cores")
def test_a_pinned_worker_runs_on_its_core_and_gives_the_same_batches(shards, tmp_path, monkeypatch):  # noqa: F811
    """The worker (a real forked DataLoader worker) writes down its CPU set once pinned; the batches equal the
    unpinned loader's and the main process keeps its whole set."""
    clear_launcher_env(monkeypatch)
    seen = tmp_path / "cpu_affinity.json"

    def recording_pin(worker, workers, world_size):
        core = cpu_affinity.pin_worker(worker, workers, world_size)
        seen.write_text(json.dumps({"core": core, "set": sorted(os.sched_getaffinity(0))}))
        return core

    monkeypatch.setattr(stream, "pin_worker", recording_pin)
    before = os.sched_getaffinity(0)
    tok = tiny_tokenizer()
    plain = list(build_loader(config(str(shards), num_workers=1), tok, rank=0, world_size=1))
    assert not seen.exists()  # off by default
    pinned = list(build_loader(config(str(shards), num_workers=1, pin_workers=True), tok, rank=0, world_size=1))
    assert json.loads(seen.read_text()) == {"core": max(before), "set": [max(before)]}
    assert os.sched_getaffinity(0) == before
    assert_same_batches(pinned, plain)
