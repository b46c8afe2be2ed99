"""Epoch arithmetic shared by every slot: samples and batches per (rank, worker) slot, from manifests alone."""

from __future__ import annotations

from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.packing import Probe, epoch_batches
from mmtrain.data.loader.shard_plan import Source, samples_per_slot
from mmtrain.errors import UserError


class Plan:
    """Epoch arithmetic shared by every slot: counts are computed from manifests before reading a byte."""

    def __init__(self, cfg: LoaderConfig, sources: list[Source], world_size: int, probe: Probe | None = None):
        self.workers = max(1, cfg.num_workers)
        self.num_slots = world_size * self.workers
        single = len(sources) == 1 and cfg.mode == "exact" and cfg.samples_per_epoch is None
        self.loop = not single
        if cfg.mode == "resampled" and cfg.samples_per_epoch is None:
            raise UserError("mode 'resampled' needs samples_per_epoch")
        total = sources[0].samples if single else (cfg.samples_per_epoch or sum(s.samples for s in sources))
        self.samples_per_slot = samples_per_slot(total, self.num_slots, cfg.uneven)
        if self.samples_per_slot == 0:
            raise UserError(f"{total} samples per epoch cannot feed {self.num_slots} ranks × workers")
        full, rest = divmod(self.samples_per_slot, cfg.batch_size)
        self.batches_per_slot = full + (1 if rest and not cfg.drop_last else 0)
        self.probe = probe
        if cfg.pack:  # a token budget per step: the epoch is sized from the length probe (packing.py)
            assert probe is not None, "packing needs a length probe"
            self.samples_per_step = probe.samples_per_budget(cfg.batch_size, cfg.max_length)
            self.batches_per_slot = epoch_batches(self.samples_per_slot, probe, cfg.batch_size, cfg.max_length)
        if self.batches_per_slot == 0:
            raise UserError(f"{self.samples_per_slot} samples per worker < batch_size {cfg.batch_size} with drop_last")
        self.steps_per_epoch = self.batches_per_slot * self.workers
        """Batches every rank yields per epoch (the same on all ranks)."""

    def batch_sizes(self, batch_size: int) -> list[int]:
        sizes = [batch_size] * (self.samples_per_slot // batch_size)
        if len(sizes) < self.batches_per_slot:
            sizes.append(self.samples_per_slot % batch_size)
        return sizes
