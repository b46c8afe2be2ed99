"""Persistent workers: the same batches and cursors as fresh workers every epoch, from the same worker processes;
an epoch left early, a resume or `close()` replaces them."""

import json
from dataclasses import replace

import pytest
from loader_fixtures import tiny_tokenizer, write_shard_set
from test_stream import assert_same_batches, config

from mmtrain.data.loader.stream import build_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("persist") / "s", [7, 5, 9])  # 21 samples, 3 shards


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("persist_text") / "t", [6, 4], text_only_every=1)


def worker_pids(loader) -> list[int]:
    running = loader._workers._iterator
    return [w.pid for w in running._workers]


def epochs_with_cursors(loader, epochs: int):
    """Every batch of `epochs` epochs, the cursor (JSON) after each, and the worker pids seen in each epoch."""
    batches, cursors, pids = [], [], []
    for _ in range(epochs):
        for batch in loader:
            batches.append(batch)
            cursors.append(json.dumps(loader.state_dict(), sort_keys=True))
        pids.append(worker_pids(loader) if loader._workers is not None else None)
    return batches, cursors, pids


def mixture(shards, text_shards):
    return [{"shards": str(shards), "weight": 0.7}, {"shards": str(text_shards), "weight": 0.3}]


@pytest.mark.parametrize("kind", ["exact", "mixture", "packed"])
def test_persistent_workers_match_fresh_workers_over_epochs(shards, text_shards, kind):
    """2 ranks × 2 workers, 3 epochs: token for token, pixel for pixel, the same cursor after every batch; the
    persistent loader keeps its two worker processes for all three epochs."""
    cfg = {"exact": config(str(shards), shuffle_buffer=3),
           "mixture": config(mixture(shards, text_shards), samples_per_epoch=18),
           "packed": config(str(shards), pack=True, batch_size=2, max_length=256)}[kind]
    tok = tiny_tokenizer()
    for rank in range(2):
        fresh = build_loader(replace(cfg, persistent_workers=False), tok, rank=rank, world_size=2)
        kept = build_loader(cfg, tok, rank=rank, world_size=2)
        expected, expected_cursors, none = epochs_with_cursors(fresh, 3)
        got, cursors, pids = epochs_with_cursors(kept, 3)
        assert none == [None, None, None]
        assert len(expected) == 3 * len(fresh) and cursors == expected_cursors
        assert_same_batches(got, expected)
        assert pids[0] == pids[1] == pids[2] and len(set(pids[0])) == 2
        kept.close()


def test_an_epoch_left_early_continues_exactly_with_new_workers(shards):
    """Break after 3 of 6 batches and iterate again: the rest of the epoch and the next one are the uninterrupted
    run's; the workers that were left mid-epoch are replaced (they were ahead of the cursor)."""
    cfg = config(str(shards), shuffle_buffer=3)
    tok = tiny_tokenizer()
    straight = build_loader(cfg, tok, rank=1, world_size=2)
    full = list(straight) + list(straight)
    loader = build_loader(cfg, tok, rank=1, world_size=2)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 3:
            break
    assert loader._workers is None  # stopped when the epoch was left
    rest = list(loader)  # fresh workers from the cursor (rotation 1: not kept for the next epoch)
    assert loader._workers is None
    after = list(loader)
    first = worker_pids(loader)
    assert_same_batches(head + rest + after, full)
    list(loader)
    assert worker_pids(loader) == first  # from an epoch's start on, the workers are kept again


def test_resume_replaces_live_workers_and_close_stops_them(shards):
    cfg = config(str(shards), shuffle_buffer=3)
    tok = tiny_tokenizer()
    loader = build_loader(cfg, tok, rank=0, world_size=2)
    list(loader)
    state = loader.state_dict()
    procs = list(loader._workers._iterator._workers)
    straight = list(loader)
    loader.load_state_dict(state)  # back to the start of epoch 1: the live workers are past it
    assert loader._workers is None and not any(p.is_alive() for p in procs)
    assert_same_batches(list(loader), straight)
    procs = list(loader._workers._iterator._workers)
    loader.close()
    assert loader._workers is None and not any(p.is_alive() for p in procs)


def test_resume_at_an_epochs_end_keeps_packed_mixture_cursors_in_step(shards, text_shards):
    """A cursor taken after an epoch's last batch (what a checkpoint on the epoch's last step holds): the resumed
    loader's workers run an epoch with nothing left, then are kept. Packing replays its read-ahead samples when it
    starts, so the workers must carry the cursor they were given, not the replayed one: the next two epochs equal
    fresh workers', batch for batch and cursor for cursor."""
    cfg = config(mixture(shards, text_shards), samples_per_epoch=18, pack=True, batch_size=2, max_length=256)
    tok = tiny_tokenizer()
    first = build_loader(cfg, tok, rank=1, world_size=2)
    for taken, _ in enumerate(first, 1):
        if taken == len(first):  # the last batch is out, the epoch's end not yet applied
            state = first.state_dict()
    assert state["batches_in_epoch"] == state["steps_per_epoch"]
    runs = {}
    for persistent in (True, False):
        loader = build_loader(replace(cfg, persistent_workers=persistent), tok, rank=1, world_size=2)
        loader.load_state_dict(json.loads(json.dumps(state)))
        assert list(loader) == []
        runs[persistent] = epochs_with_cursors(loader, 2)
        loader.close()
    (got, cursors, pids), (expected, expected_cursors, _) = runs[True], runs[False]
    assert len(got) == 2 * len(first) and cursors == expected_cursors and pids[0] == pids[1]
    assert_same_batches(got, expected)


def test_a_leftover_iteration_does_not_stop_the_workers_of_a_newer_one(shards):
    """One batch per transfer and 6 per worker: the newer iteration's workers still have batches to make when the
    leftover generator is finalized."""
    cfg = config(str(shards), shuffle_buffer=3, transfer_samples=1)
    tok = tiny_tokenizer()
    straight = list(build_loader(cfg, tok, rank=0, world_size=1))
    assert len(straight) == 12
    loader = build_loader(cfg, tok, rank=0, world_size=1)
    older = iter(loader)
    head = [next(older)]
    newer = iter(loader)  # continues the epoch from the cursor, with new workers
    head.append(next(newer))
    older.close()  # the leftover generator is finalized while the newer one runs
    assert_same_batches(head + list(newer), straight)
