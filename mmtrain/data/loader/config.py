"""`LoaderConfig`: every knob of the streaming loader, with its one default and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmtrain.data.loader import worker_handoff
from mmtrain.data.loader.grouping import WINDOW, check_config
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.remote_files import FetchOptions
from mmtrain.errors import UserError


@dataclass
class LoaderConfig:
    """Every knob of the streaming loader, with its default. A recipe sets the knobs of `mmtrain.config.LoaderSpec`
    per stage and the trainer fills the rest; a default here equals the recipe tree's for the same knob (tested in
    tests/train/test_config_tree.py), so a loader built by hand reads data as the trainer does."""

    data: Any
    """One shard set (a directory, its manifest, a URL, or brace-ranged shard files), or a mixture: a list of
    `{shards: DIR | URL | [DIR...], weight: float}`."""
    num_image_slots: int
    """Placeholder tokens per image: `mmtrain.model.num_image_slots(config)` (abstractor 65, mlp patches, xattn 1,
    layerwise 0: no tokens, the image sits at the first token after its mark)."""
    template: str = "owl"
    split: str = "train"
    batch_size: int = 4
    """Samples per step on each rank; with `pack`, rows of `max_length` tokens per step (a token budget)."""
    max_length: int = 512
    truncate: bool = True
    """Cut longer samples (dropped if no label survives); False: drop every sample longer than max_length."""
    mode: str = "exact"
    """`exact`: each sample once per epoch; `resampled`: endless seeded shard draws (needs samples_per_epoch)."""
    samples_per_epoch: int | None = None
    """Samples per epoch over all ranks; default one pass over a single source, or the mixture's total."""
    uneven: str = "pad"
    """When samples do not divide over ranks × workers: `pad` repeats a few (flagged `filler`), `trim` drops them."""
    drop_last: bool = False
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    pack: bool = False
    """Fill `batch_size` rows of `max_length` tokens per step with whole samples (see packing.py, docs/loader.md)."""
    group_by: str = "none"
    """`modality_length`: each batch holds image or text-only samples of similar length (grouping.py); `none`."""
    group_window: int = WINDOW
    """Batches read and grouped together with `group_by` (per worker: its decoded images are held, its start re-read
    on resume)."""
    pad_to_multiple: int = 8
    num_workers: int = 1
    transfer_samples: int = worker_handoff.TRANSFER_SAMPLES
    """Samples a worker sends per DataLoader item, in whole batches (worker_handoff.py: the item's fixed cost is paid
    once for several batches). Batches, order and cursor do not depend on it; the pixel ring grows with it."""
    persistent_workers: bool = True
    """Keep the DataLoader workers from one epoch to the next (each carries its slot's cursor into the next epoch
    itself, as the main process does): no fork per epoch, and the copy-on-write and first-touch page faults of a fresh
    worker are paid once per run. A resume (`load_state_dict`) or an epoch left early starts fresh workers."""
    pin_workers: bool = False
    """Keep each worker on one core of this process's CPU set, taken from the end (cpu_affinity.py: which core, and why
    it is off by default)."""
    image: ImageConfig = field(default_factory=ImageConfig)
    on_bad_sample: str = "skip"
    """`skip` an unreadable sample with one warning naming shard, key and reason, count it, read the next (see
    docs/loader.md, Bad samples), or `raise` (BadSample: a ValueError naming shard, key and reason)."""
    max_image_pixels: int = 64_000_000
    """An image whose header declares more pixels is refused before it is decoded (`image_too_large`)."""
    shard_cache: str | None = None
    """Directory where shards named by URL (`s3://`, `gs://`, `https://`) are kept once fetched, shared by runs and
    processes; None: the `MMTRAIN_SHARD_CACHE` variable, else each shard is fetched into a scratch file deleted as the
    reader moves on (mmtrain/data/remote_files.py)."""
    shard_retries: int = 5
    """Tries after the first when fetching a remote shard or manifest fails on a timeout, a dropped connection or an
    HTTP 5xx (never on 4xx); then the shard is unreachable (`on_bad_sample` decides)."""
    shard_backoff: float = 1.0
    """Seconds before the first retry, doubled for each later one."""
    shard_timeout: float = 60.0
    """Seconds a connection or a read of a remote shard may stall before the try counts as failed."""

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "resampled"):
            raise UserError(f"loader mode must be 'exact' or 'resampled', got {self.mode!r}")
        if self.uneven not in ("pad", "trim"):
            raise UserError(f"uneven must be 'pad' or 'trim', got {self.uneven!r}")
        if self.on_bad_sample not in ("skip", "raise"):
            raise UserError(f"on_bad_sample must be 'skip' or 'raise', got {self.on_bad_sample!r}")
        if self.max_image_pixels < 1:
            raise UserError(f"max_image_pixels must be positive, got {self.max_image_pixels}")
        if self.batch_size < 1 or self.num_workers < 0 or self.transfer_samples < 1:
            raise UserError("batch_size and transfer_samples must be >= 1 and num_workers >= 0")
        check_config(self.group_by, self.group_window, self.pack)
        self.fetch_options()  # checks the shard_* knobs

    def fetch_options(self) -> FetchOptions:
        """How shards named by URL are fetched (the `shard_*` knobs)."""
        return FetchOptions(self.shard_cache, self.shard_retries, self.shard_backoff, self.shard_timeout)
