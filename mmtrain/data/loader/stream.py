"""Streaming loader: shard sets → per-(rank, worker) sample streams → mixed → templated → collated batches.

The only data module that knows about ranks. Stages, in order (each a small function or class):
  plan (shard_plan.py: shard order per epoch, split by rank × worker) → read (tar_index.py: seek into tar shards, webdataset
  grouping/decoding) → cursor (cursor.py: block shuffle, exact position) → mix (seeded, counter-based draws by
  weight) → check (bad_samples.py: bad samples skipped with a warning, or raised) → render template (drop samples
  with nothing to learn) → decode images → batch → collate/pack. Skips and drops are counted per reason in the
  cursor. One slot's producer (read → … → ship) is `slot.SlotStream`; this module holds the main-process side
  (the DataLoader, hand-off from the workers, pixels out of the ring, the cursor); the knobs are `config.LoaderConfig`
  and the epoch arithmetic is `epoch.Plan`.

Every slot (rank × worker) yields exactly `samples_per_slot` samples per epoch in the same number of batches, so
every rank takes the same number of steps whatever the shard sizes, drops or filters. See docs/loader.md.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtrain.data.chunking import chunked
from mmtrain.data.loader import collate as collate_mod
from mmtrain.data.loader import worker_handoff
from mmtrain.data.loader.bad_samples import merge_counts
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.cpu_affinity import local_world_size, pin_worker
from mmtrain.data.loader.cursor import fresh_position
from mmtrain.data.loader.epoch import Plan
from mmtrain.data.loader.grouping import layout
from mmtrain.data.loader.packing import LOOKAHEAD, end_epoch, probe_sources
from mmtrain.data.loader.pixel_buffers import PREFETCH, PixelRing
from mmtrain.data.loader.shard_plan import make_sources
from mmtrain.data.loader.slot import SlotStream, copy_state
from mmtrain.data.loader.templates import Renderer
from mmtrain.errors import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RING_BYTES = 64 << 20
"""Cap on the shared pixel ring per rank: transfers shrink to fit it (or `ring_budget()`, where /dev/shm is small),
and packed steps' slots. A padded ring of one-batch transfers is not capped (batch_size images per slot)."""
STATE_VERSION = 1  # cursors without `read` (taken before it was counted) load with read = 0


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where torch maps shared memory; None where there is no such file system."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def ring_budget() -> int:
    """Bytes a rank's pixel ring may grow to for transfers: RING_BYTES, or less where /dev/shm is small (a
    container's default is 64 MB): half its free space, shared by this node's ranks."""
    free = shm_free_bytes()
    if free is None:
        return RING_BYTES
    return min(RING_BYTES, free // (2 * local_world_size()))


def dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world size, defaulting from torch.distributed when it is initialized, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return rank, world_size


def _as_sent(batch: dict) -> dict:
    """DataLoader collate_fn: keep the worker's numpy arrays as they are. The default would turn each into a tensor,
    and every tensor crosses to the main process as its own shared-memory file (~0.6 ms each, measured)."""
    return batch


def next_epoch(state: dict, loop: bool) -> None:
    """A slot's cursor at the end of its epoch → the cursor the next epoch starts from. The main process applies it
    to every slot of its rank and a persistent worker to its own copy, so both agree without a message."""
    state.update(epoch=state["epoch"] + 1, batches=0)
    end_epoch(state, loop)


def initial_state(num_sources: int) -> dict:
    """A slot's cursor at the start: `read` counts samples pulled (delivered + skipped), `dropped` the skipped ones
    by reason; both cover exactly the batches handed out."""
    return {"epoch": 0, "batches": 0, "draws": 0, "sources": [fresh_position() for _ in range(num_sources)],
            "dropped": {}, "read": 0}


class StreamDataset(IterableDataset):
    """What each DataLoader worker runs: the slot for (rank, worker), started from its cursor."""

    def __init__(self, loader: "StreamLoader", rotation: int):
        self.cfg, self.sources, self.plan = loader.cfg, loader.sources, loader.plan
        self.renderer, self.pad_id, self.rank = loader.renderer, loader.pad_id, loader.rank
        self.world_size = loader.world_size
        self.states = {slot: copy_state(s) for slot, s in loader.slots.items()}
        self.rotation = rotation
        self.ring = loader.ring
        self.per_transfer = loader.per_transfer

    def __iter__(self) -> Iterator[list[dict]]:
        """Lists of `per_transfer` batches (worker_handoff.py)."""
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and self.cfg.pin_workers:
            pin_worker(worker, info.num_workers, self.world_size)
        logical = (worker + self.rotation) % self.plan.workers
        slot = self.rank * self.plan.workers + logical
        last = copy_state(self.states[slot])  # the main process's cursor, if this epoch has no batch left (packing's
        # replay of read-ahead samples moves the live state before the first batch)
        batches = SlotStream(self.cfg, self.sources, self.plan, self.renderer, self.pad_id, slot,
                             self.states[slot], self.ring, worker).batches()
        for transfer in chunked(batches, self.per_transfer):  # transfers (worker_handoff.py)
            last = transfer[-1]["cursor"][1]
            yield transfer
        if info is not None:  # the epoch ran to its end: a persistent worker starts the next one from here
            self.states[slot] = copy_state(last)
            next_epoch(self.states[slot], self.plan.loop)


class StreamLoader:
    """Iterable of batches for one rank; each `iter()` runs the rest of the current epoch, then advances it.

    `state_dict()` / `load_state_dict()` hold this rank's cursor: per worker slot the epoch, batches taken, source
    positions (shard order is recomputed from seed + epoch) and the mixer's draw counter.
    """

    def __init__(self, cfg: LoaderConfig, tokenizer, rank: int | None = None, world_size: int | None = None):
        self.cfg = cfg
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.sources = make_sources(cfg.data, cfg.split, cfg.fetch_options())
        self.renderer = Renderer(tokenizer, cfg.template, cfg.num_image_slots, cfg.max_length, cfg.truncate)
        probe = probe_sources(self.sources, self.renderer) if cfg.pack else None
        self.plan = Plan(cfg, self.sources, self.world_size, probe)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        first = self.rank * self.plan.workers
        self.slots = {s: initial_state(len(self.sources)) for s in range(first, first + self.plan.workers)}
        self.epoch = 0
        self.batches_in_epoch = 0
        self.ring: PixelRing | None = None
        self._workers: DataLoader | None = None
        """The DataLoader of persistent workers (`persistent_workers`), kept between complete epochs."""
        self._reusable = False
        self.per_transfer = self._transfer_batches()
        """Batches per DataLoader item (worker_handoff.py); the pixel ring holds (prefetch + 2) transfers per worker."""

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        rotation = self.batches_in_epoch % self.plan.workers
        loader = self._dataloader(rotation)
        norm = (tuple(self.cfg.image.mean), tuple(self.cfg.image.std))
        slots = [self.rank * self.plan.workers + w for w in range(self.plan.workers)]
        complete = False
        try:
            for batch in worker_handoff.in_slot_order(iter(loader), slots, self.batches_in_epoch,
                                               self.plan.steps_per_epoch):
                slot, state = batch.pop("cursor")
                ref = batch.pop("pixel_ring", None)
                if ref is not None:
                    assert self.ring is not None
                    batch["pixel_values"] = self.ring.view(ref)
                out = collate_mod.to_torch(batch)  # copies the uint8 pixels out of the ring slot (one memcpy)
                if ref is not None:
                    self.ring.check(ref)
                out["pixel_norm"] = norm
                self.slots[slot] = state
                self.batches_in_epoch += 1
                yield out
            complete = True
        finally:  # workers that ran the epoch to its end already hold the next epoch's cursor; any others go
            if self._workers is loader:  # not when a newer iteration has replaced them (a leftover generator)
                self._reusable = complete and rotation == 0
                if not self._reusable:
                    self.close()
        self.epoch += 1
        self.batches_in_epoch = 0
        for state in self.slots.values():
            next_epoch(state, self.plan.loop)

    def _dataloader(self, rotation: int) -> DataLoader:
        """The live persistent workers when they ran the last epoch to its end from the epoch's start (they carried
        the cursor on themselves), else a new DataLoader whose workers fork from this cursor."""
        if self._reusable:  # set only by an epoch that ran from its start to its end on these workers
            self._reusable = False
            return self._workers
        self.close()
        workers = self.cfg.num_workers
        if workers and self.ring is None:  # mapped before the workers fork; reused by every epoch
            self.ring = PixelRing(workers, self._ring_capacity(), self.cfg.image.size, self._ring_depth())
        persistent = bool(workers) and self.cfg.persistent_workers
        loader = DataLoader(StreamDataset(self, rotation), batch_size=None, num_workers=workers,
                            persistent_workers=persistent, collate_fn=_as_sent,
                            prefetch_factor=PREFETCH if workers else None)
        if persistent:
            self._workers = loader
        return loader

    def close(self) -> None:
        """Stop the persistent workers now (they also stop with this loader, or at exit)."""
        loader, self._workers, self._reusable = self._workers, None, False
        running = getattr(loader, "_iterator", None)
        if running is not None:
            running._shutdown_workers()  # what the DataLoader iterator's own __del__ does

    def _ring_depth(self) -> int:
        """Batch slots per worker: (prefetch + 2) transfers (the safety argument is in pixel_buffers.py)."""
        return (PREFETCH + 2) * self.per_transfer

    def _images_per_batch(self) -> int:
        """Images a batch's ring slot should hold: batch_size, or for packed steps the probe's images per budget
        with a margin plus the images of the samples that may wait for the next step (they are decoded into the
        slot of the step that read them and moved on)."""
        if not self.cfg.pack:
            return self.cfg.batch_size
        probe = self.plan.probe
        assert probe is not None
        per_sample = probe.images_per_sample()
        want = math.ceil(1.25 * per_sample * probe.samples_per_budget(self.cfg.batch_size, self.cfg.max_length)
                         + LOOKAHEAD * per_sample)
        return max(want, self.cfg.batch_size)

    def _transfer_batches(self) -> int:
        """`transfer_samples` in whole batches, fewer if the ring would pass `ring_budget()` (never below 1: a
        padded ring of one-batch transfers is never capped)."""
        per_batch = self.plan.samples_per_step if self.cfg.pack else self.cfg.batch_size
        wanted = worker_handoff.batches_per_transfer(per_batch, self.cfg.num_workers, self.cfg.transfer_samples)
        per_transfer = self._images_per_batch() * self._image_bytes_all_workers() * (PREFETCH + 2)
        return max(1, min(wanted, ring_budget() // per_transfer))

    def _image_bytes_all_workers(self) -> int:
        """Bytes of one uint8 image position in every worker's ring."""
        return self.cfg.image.size ** 2 * 3 * self.plan.workers

    def _ring_capacity(self) -> int:
        """Images per batch slot: `_images_per_batch`, for packed steps capped at RING_BYTES in all (a batch with
        more images travels as a tensor)."""
        if not self.cfg.pack:
            return self.cfg.batch_size
        per_image = self._image_bytes_all_workers() * self._ring_depth()
        return max(1, min(self._images_per_batch(), RING_BYTES // per_image))

    def sample_counts(self) -> dict:
        """`{"read": n, "skipped": {reason: n}}` for this rank since the run began (restored on resume): samples
        pulled from the shards for the batches consumed so far (delivered + skipped), and the skipped ones by reason
        (`skips.DATA_REASONS`: unreadable, warned; `skips.TEMPLATE_REASONS`: nothing to learn). Samples read ahead
        by workers for batches not yet consumed are not counted."""
        return {"read": sum(s.get("read", 0) for s in self.slots.values()), "skipped": self.dropped()}

    def dropped(self) -> dict[str, int]:
        """Skipped samples of this rank by reason (`sample_counts()["skipped"]`)."""
        return merge_counts(list(self.slots.values()))

    def _group(self) -> str:
        """The grouping a cursor is exact under (`grouping.layout`)."""
        return layout(self.cfg.group_by, self.cfg.group_window)

    def state_dict(self) -> dict:
        """JSON-serializable cursor of this rank (save one per rank)."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.plan.workers, "seed": self.cfg.seed, "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch, "steps_per_epoch": self.plan.steps_per_epoch,
                "pack": self.cfg.pack, "group": self._group(),
                "slots": {str(s): copy_state(st) for s, st in self.slots.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. The layout (ranks × workers, seed) must be the same."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data cursor version {state.get('version')} != {STATE_VERSION}")
        for name, mine in (("rank", self.rank), ("world_size", self.world_size), ("num_workers", self.plan.workers),
                           ("seed", self.cfg.seed)):
            if state[name] != mine:
                raise UserError(f"data cursor was taken with {name}={state[name]}, this run has {mine}; exact "
                                "resume needs the same ranks × workers layout and seed")
        for name, mine in (("pack", self.cfg.pack), ("steps_per_epoch", self.plan.steps_per_epoch)):
            if name in state and state[name] != mine:  # older cursors lack these
                raise UserError(f"data cursor was taken with {name}={state[name]}, this run has {mine}; exact "
                                "resume needs the same data, batch_size, max_length, pack and tokenizer")
        if state.get("group", "none") != self._group():  # older cursors were all ungrouped
            raise UserError(f"data cursor was taken with grouping {state.get('group', 'none')}, this run has "
                            f"{self._group()}; exact resume needs the same group_by and group_window")
        self.close()  # live workers hold the old cursor
        self.epoch = state["epoch"]
        self.batches_in_epoch = state["batches_in_epoch"]
        self.slots = {int(s): copy_state(st) for s, st in state["slots"].items()}


def build_loader(cfg: LoaderConfig, tokenizer, rank: int | None = None, world_size: int | None = None) -> StreamLoader:
    """The trainer's entry point: a resumable iterable of batches for this rank."""
    return StreamLoader(cfg, tokenizer, rank, world_size)
