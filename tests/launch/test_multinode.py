"""Multi-node without a cluster: two torchrun "nodes" on this machine (1 rank each, c10d rendezvous on 127.0.0.1,
as launch/slurm/train.sbatch starts them) split the shards with no sample seen twice, and train exactly as one node
with 2 processes does (same per-step losses, bit for bit: fp32 on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from mmtrain.launching import free_port
from mmtrain.data.shards.writer import read_manifest

from train_helpers import metrics, stage, write_recipe

HERE = Path(__file__).resolve().parent
STEPS = 6


def torchrun(nnodes: int, nproc: int, target: list[str], log: Path, timeout: float = 150) -> None:
    """Start `nnodes` torchrun agents on this machine (like one per node under srun) and wait for all of them."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = []
    logs = [log.with_name(f"{log.stem}-node{n}.log") for n in range(nnodes)]
    try:
        for n in range(nnodes):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
                   "--max-restarts=0", *target]
            with open(logs[n], "w") as fh:
                procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.time() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish in {timeout} s:\n" + "\n".join(l.read_text()[-2000:] for l in logs))
    finally:
        for p in procs:  # the agents and their ranks (own sessions), if still running
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    bad = [(n, p.returncode) for n, p in enumerate(procs) if p.returncode != 0]
    assert not bad, f"agents failed {bad}:\n" + "\n".join(l.read_text()[-3000:] for l in logs)


@pytest.fixture(scope="module")
def recipe(launch_data, tmp_path_factory) -> Path:
    """The exact loader (each sample once per epoch), one stage of 6 steps; max_length 256 so that no sample is
    dropped (at 192, 6 of the 230 lose every label to truncation and are replaced by filler)."""
    root = tmp_path_factory.mktemp("multinode")
    return write_recipe(root / "recipe.yaml", launch_data, [
        stage("pretrain", launch_data, train={"vision": True, "connector": True, "llm": "full"},
              optimizer={"lr": 2e-3}, steps=STEPS, max_length=256,
              loader={"num_workers": 0, "mode": "exact", "shuffle_buffer": 50}),
    ])


def test_two_nodes_split_the_shards_with_no_sample_twice(recipe: Path, launch_data, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    torchrun(2, 1, [str(HERE / "probe_loader.py"), "--recipe", str(recipe), "--out", str(out)], tmp_path / "probe.log")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    assert sorted(r["node"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["local_rank"] == 0 for r in ranks)  # one process per node
    manifest = read_manifest(launch_data["mm"])
    total = manifest["splits"]["train"]["samples"]
    by_node = {r["node"]: [k for b in r["batches"] for k in b["keys"]] for r in ranks}
    assert [r["dropped"] for r in ranks] == [{}, {}]
    assert all(not any(f) for r in ranks for f in (b["filler"] for b in r["batches"]))  # 230 = 2 × 115: no padding
    assert ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"]  # the same number of steps on both nodes
    seen = Counter(k for keys in by_node.values() for k in keys)
    twice = [k for k, n in seen.items() if n > 1]
    assert not twice, f"samples seen more than once: {twice[:5]}"
    shard_of = {}
    for s in manifest["splits"]["train"]["shards"]:
        with tarfile.open(launch_data["mm"] / s["name"]) as tar:
            shard_of.update({m.name.split(".", 1)[0]: s["name"] for m in tar})
    assert set(seen) == set(shard_of) and len(seen) == total  # every sample of the epoch, each exactly once
    assert [len(by_node[0]), len(by_node[1])] == [total // 2, total - total // 2] == ranks[0]["counts"]
    # Split by shards: each node reads a contiguous run of the epoch's shard order, so at most one shard is cut.
    shards = {n: {shard_of[k] for k in keys} for n, keys in by_node.items()}
    assert len(shards[0] & shards[1]) <= 1, shards
    assert len(shards[0] | shards[1]) == len(manifest["splits"]["train"]["shards"])


def test_two_nodes_train_exactly_like_one_node_with_two_processes(recipe: Path, tmp_path: Path) -> None:
    train = ["-m", "mmtrain.train", "--recipe", str(recipe)]
    torchrun(1, 2, [*train, "--out", str(tmp_path / "one")], tmp_path / "one.log")
    torchrun(2, 1, [*train, "--out", str(tmp_path / "two")], tmp_path / "two.log")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in two] == [m["loss"] for m in one]  # fp32 on CPU: bit-exact
    stages = [json.loads(l) for l in (tmp_path / "two" / "stages.jsonl").read_text().splitlines()]
    assert stages[0]["world_size"] == 2
    assert (tmp_path / "two" / "stages" / "pretrain" / "complete.json").is_file()
