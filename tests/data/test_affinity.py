"""Opt-in worker pinning: which core each worker takes, and a real DataLoader worker pinned there."""

import json
import os

import pytest
from loader_fixtures import tiny_tokenizer
from test_handoff import shards  # noqa: F401  (the module-scoped shard set)
from test_stream import assert_same_batches, config

from mmtrain.data import affinity, stream
from mmtrain.data.affinity import local_rank, worker_core
from mmtrain.data.stream import build_loader


def test_cores_come_from_the_end_of_the_set_one_per_worker_and_rank():
    assert worker_core({0, 1}, 0, 1, 0) == 1  # this VM: the main process keeps core 0 to itself
    assert [worker_core({0, 1}, 0, 2, w) for w in range(2)] == [1, 0]
    shared = range(8)  # two ranks sharing one unbound set: four different cores
    assert [worker_core(shared, r, 2, w) for r in range(2) for w in range(2)] == [7, 6, 5, 4]
    own = {4, 5, 6, 7}  # rank 1 bound to its own set stays inside it
    assert [worker_core(own, 1, 2, w) for w in range(2)] == [5, 4]
    assert [worker_core({2, 9, 5}, 0, 4, w) for w in range(4)] == [9, 5, 2, 9]  # more workers than cores: wraps
    assert worker_core({3}, 0, 1, 0) is None


def test_local_rank_from_the_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert local_rank() == 2
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_rank() == 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs sched_setaffinity and two cores")
def test_a_pinned_worker_runs_on_its_core_and_gives_the_same_batches(shards, tmp_path, monkeypatch):  # noqa: F811
    """The worker (a real forked DataLoader worker) writes down its CPU set once pinned; the batches equal the
    unpinned loader's and the main process keeps its whole set."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    seen = tmp_path / "affinity.json"

    def recording_pin(worker, workers):
        core = affinity.pin_worker(worker, workers)
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
