"""Transfers (several batches per DataLoader item): same batches, same order, same cursor as one batch per item."""

import json
import time
from dataclasses import replace

import pytest
from loader_fixtures import tiny_tokenizer, write_shard_set
from test_fastpaths import loader_config, model_size_shards
from test_stream import assert_same_batches, config, take_then_resume

from mmtrain.data.loader import stream, worker_handoff
from mmtrain.data.chunking import chunked
from mmtrain.data.loader.worker_handoff import batches_per_transfer, in_slot_order
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.pixel_buffers import PREFETCH
from mmtrain.data.loader.stream import RING_BYTES, StreamLoader, build_loader


def tagged(slot, n):
    return [{"cursor": (slot, None), "i": i} for i in range(n)]


def test_transfers_group_a_workers_batches_in_order():
    assert [[b["i"] for b in t] for t in chunked(iter(tagged(0, 7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches_per_transfer(8, workers=1) == 4 and batches_per_transfer(5, workers=2) == 7
    assert batches_per_transfer(8, workers=0) == 1 and batches_per_transfer(100, workers=2) == 1
    assert batches_per_transfer(0.0, workers=1) == worker_handoff.TRANSFER_SAMPLES  # a text-free packed probe
    assert batches_per_transfer(8, workers=1, samples=1) == 1 and batches_per_transfer(8, 1, samples=17) == 3


def test_in_slot_order_interleaves_transfers_round_robin():
    """Slot 5 resumed one batch ahead of slot 4 (start = 3 of 8): b3 is slot 5's, then 4, 5, 4, ...; the DataLoader
    hands transfers of 2 in its own worker order, starting with the slot due first."""
    a, b = tagged(4, 2), tagged(5, 3)  # remaining: slot 4 batches 0-1 (of its 2), slot 5 batches 0-2
    items = iter([b[0:2], a[0:2], b[2:3]])
    got = [(x["cursor"][0], x["i"]) for x in in_slot_order(items, [4, 5], start=3, count=8)]
    assert got == [(5, 0), (4, 0), (5, 1), (4, 1), (5, 2)]


def test_in_slot_order_refuses_an_epoch_of_the_wrong_length():
    with pytest.raises(RuntimeError, match="ended the epoch at batch 3 of 4"):
        list(in_slot_order(iter([tagged(0, 2), tagged(1, 1)]), [0, 1], 0, 4))
    with pytest.raises(RuntimeError, match="yielded 1 batches past the epoch's 4"):
        list(in_slot_order(iter([tagged(0, 3), tagged(1, 2)]), [0, 1], 0, 4))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("handoff") / "s", [7, 5, 9, 11])  # 32 samples, 4 shards


def batches_and_cursors(loader):
    """One epoch: the batches, and the cursor (as JSON) after each."""
    batches, cursors = [], []
    for batch in loader:
        batches.append(batch)
        cursors.append(json.dumps(loader.state_dict(), sort_keys=True))
    return batches, cursors


@pytest.mark.parametrize("per_item", [4, 6])
def test_two_workers_give_the_same_batches_in_any_transfer_size(shards, per_item):
    """2 workers × 2 ranks, batches of 2, 4 batches per slot: transfers of 2 or 3 batches (the last one short)
    against one batch per item, token for token and pixel for pixel, with the same cursor after every batch, on
    each rank; and a resume taken in the middle of a transfer."""
    cfg = config(str(shards), shuffle_buffer=3, transfer_samples=per_item)
    tok = tiny_tokenizer()
    for rank in range(2):
        single = build_loader(replace(cfg, transfer_samples=1), tok, rank=rank, world_size=2)
        grouped = build_loader(cfg, tok, rank=rank, world_size=2)
        assert (single.per_transfer, grouped.per_transfer) == (1, per_item // 2)
        expected, expected_cursors = batches_and_cursors(single)
        got, cursors = batches_and_cursors(grouped)
        assert len(expected) == 8 and cursors == expected_cursors
        assert_same_batches(got, expected)
    take_then_resume(cfg, 3)  # batch 3 of 8: the middle of slot 1's first transfer


def slowly(loader):
    out = []
    for batch in loader:
        time.sleep(0.02)  # the worker runs as far ahead as the DataLoader lets it
        out.append(batch)
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_ring_slots_are_not_reused_while_a_slow_consumer_holds_a_transfer(tmp_path, packed):
    """1 worker, transfers of 2 batches, so the ring has (2 + 2) × 2 = 8 slots for 20 batches (packed: 15 steps of
    ~4.6 samples, some waiting for the next step, their images carried to the next slot); the main process dawdles over
    each batch. Every batch must equal the in-process one pixel for pixel (a slot overwritten too early would fail
    the ring's stamp check or differ)."""
    data = model_size_shards(tmp_path / "s", sizes=(30, 30), text_only_every=0, images_each=1)  # all in the ring
    extra = dict(pack=True, max_length=400, batch_size=2) if packed else {}
    tok = tiny_tokenizer()
    plain = list(build_loader(loader_config(data, **extra), tok, rank=0, world_size=1))
    loader = build_loader(loader_config(data, num_workers=1, transfer_samples=6, **extra), tok, rank=0, world_size=1)
    slow = slowly(loader)
    assert loader.per_transfer == 2 and loader.ring.depth == 8 and len(plain) == (15 if packed else 20)
    assert_same_batches(slow, plain)


def test_a_ring_one_transfer_too_shallow_is_caught(tmp_path, monkeypatch):
    """The same slow consumer with depth = prefetch × transfer (4 slots): the worker reuses the slot of a batch the
    main process has not copied yet, and the stamp check says so instead of handing on mixed pixels."""
    data = model_size_shards(tmp_path / "s", sizes=(30, 30), text_only_every=0, images_each=1)
    monkeypatch.setattr(StreamLoader, "_ring_depth", lambda self: PREFETCH * self.per_transfer)
    loader = build_loader(loader_config(data, num_workers=1, transfer_samples=6), tiny_tokenizer(), rank=0,
                          world_size=1)
    with pytest.raises(RuntimeError, match="was overwritten while batch"):
        slowly(loader)


@pytest.mark.parametrize("workers, batches", [(1, 4), (2, 4), (4, 3), (8, 1)])
def test_transfers_shrink_to_keep_the_ring_under_its_cap(shards, monkeypatch, workers, batches):
    """224 px, batches of 8: a one-batch slot per worker is 8 × 224² × 3 B = 1.2 MB, and the ring holds 4 transfers
    per worker. 32 samples are 4 batches; 64 MiB allows 13 / 6 / 3 / 1 of them at 1 / 2 / 4 / 8 workers."""
    monkeypatch.setattr(stream, "shm_free_bytes", lambda: None)
    cfg = config(str(shards), num_workers=workers, batch_size=8, image=ImageConfig(size=224))
    loader = build_loader(cfg, tiny_tokenizer(), rank=0, world_size=1)
    assert loader.per_transfer == batches
    assert workers * loader._ring_depth() * loader._ring_capacity() * 224 * 224 * 3 <= RING_BYTES


@pytest.mark.parametrize("batch_size, ranks_on_node, batches", [(8, 1, 4), (8, 8, 1), (1, 1, 32), (1, 8, 6)])
def test_transfers_shrink_to_fit_a_small_dev_shm(shards, monkeypatch, batch_size, ranks_on_node, batches):
    """A container's 64 MB /dev/shm, shared by the node's ranks: each rank's ring may take half of its share. At
    8 ranks that is 4 MB: one batch of 8 per transfer (the ring of one-batch transfers is never cut: 4.8 MB), or 6
    batches of 1 (3.6 MB); a rank alone gets 32 MB, enough for 32 samples."""
    monkeypatch.setattr(stream, "shm_free_bytes", lambda: 64_000_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks_on_node))
    cfg = config(str(shards), num_workers=1, batch_size=batch_size, image=ImageConfig(size=224))
    assert build_loader(cfg, tiny_tokenizer(), rank=0, world_size=1).per_transfer == batches
