"""One stage of a recipe: what trains, how (optimizer, schedule, LoRA), on what data, read how (the loader knobs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmtrain.config.typed import Bool, FieldError, Float, Int, Spec, at_least

Part = Literal["vision", "connector", "llm"]
"""The model's parts (mmtrain/model/lora.py PARTS)."""
LoraRole = Literal["self_attn", "cross_attn", "ffn", "vision"]
"""Where LoRA can go (mmtrain/model/lora.py ROLES)."""


@dataclass
class TrainParts(Spec):
    """What a stage trains: whole parts, LoRA on the LLM, or nothing of a part."""

    vision: Bool | Int = False
    """True (all), False (frozen) or N (the last N encoder layers)."""
    connector: Bool = True
    """Train the connector (abstractor, resampler, cross-attention or adapters)."""
    llm: Literal["frozen", "lora", "full"] = "frozen"
    """frozen | lora (adapters on `lora.roles`, the LLM itself frozen) | full."""

    def check(self) -> None:
        if not isinstance(self.vision, bool):
            at_least(self, "vision", 0)


@dataclass
class LoraSpec(Spec):
    """LoRA adapters: where they go and their size."""

    roles: list[LoraRole] = field(default_factory=list)
    """self_attn | cross_attn | ffn | vision (see mmtrain/model/lora.py for the module names of each)."""
    r: Int = 8
    """Rank of each adapter's update."""
    alpha: Int = 16
    """Scale of the update: it is multiplied by alpha / r."""
    dropout: Float = 0.0
    """Dropout on each adapter's input."""

    def check(self) -> None:
        at_least(self, "r", 1)
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError(("dropout",), f"must be in [0, 1), not {self.dropout!r}", sep=" ")


@dataclass
class OptimizerSpec(Spec):
    """AdamW, per-part learning rates."""

    lr: Float = 1e-4
    """Learning rate of every part not named in `lr_per_part`."""
    lr_per_part: dict[Part, Float] = field(default_factory=dict)
    """e.g. {connector: 1e-4, llm: 2e-5}: parts are vision, connector, llm (LoRA weights count under their part)."""
    weight_decay: Float = 0.0
    """AdamW's decoupled weight decay."""
    betas: tuple[Float, Float] = (0.9, 0.999)
    """AdamW's β1 and β2."""
    eps: Float = 1e-8
    """AdamW's ε."""
    grad_clip: Float = 1.0
    """Clip the global gradient norm to this (DeepSpeed's gradient_clipping; 0: no clipping)."""

    def lr_of(self, part: str) -> float:
        return float(self.lr_per_part.get(part, self.lr))  # type: ignore[call-overload]


@dataclass
class ScheduleSpec(Spec):
    """Linear warm-up, then cosine decay over the stage's steps."""

    warmup_steps: Int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""
    min_lr_ratio: Float = 0.1
    """Cosine decay from lr to lr × min_lr_ratio at the last step."""

    def check(self) -> None:
        at_least(self, "warmup_steps", 0)


@dataclass
class DataSource(Spec):
    """One entry of a stage's data mixture (a bare directory in YAML means weight 1)."""

    shards: str | list[str]
    """A shard-set directory (or its manifest.json), local or a URL (s3://, gs://, https://), or shard files named
    with a brace range (DIR/train-{000000..000009}.tar), or several read as one source."""
    weight: Float = 1.0
    """This source's share of the mixture, relative to the other sources' weights."""

    def check(self) -> None:
        if self.weight <= 0:
            raise FieldError(("weight",), f"must be > 0, not {self.weight!r}", sep=" ")

    @classmethod
    def expand(cls, raw: Any) -> Any:
        return {"shards": raw} if isinstance(raw, str) else raw


@dataclass
class LoaderSpec(Spec):
    """The streaming loader's knobs a stage may set (mmtrain/data/loader/config.py LoaderConfig, where each is
    explained at length). Data, batch, length, packing, template, seed, images and the bad-sample policy come from
    the stage and the recipe, not from here. Each default equals LoaderConfig's (tests/train/test_config_tree.py)."""

    mode: Literal["exact", "resampled"] = "exact"
    """exact: each sample once per epoch; resampled: endless seeded shard draws (needs samples_per_epoch)."""
    samples_per_epoch: Int | None = None
    """Samples per epoch over all ranks; default one pass over a single source, or the mixture's total."""
    uneven: Literal["pad", "trim"] = "pad"
    """When samples do not divide over ranks × workers: pad repeats a few (flagged filler), trim drops them."""
    drop_last: Bool = False
    """Drop each worker's last, short batch of an epoch."""
    shuffle: Bool = True
    """Seeded shard order per epoch and a seeded permutation within blocks of shuffle_buffer samples."""
    shuffle_buffer: Int = 1000
    """Consecutive samples shuffled together."""
    truncate: Bool = True
    """Cut samples longer than max_length (dropped if no label survives); false: drop every longer sample."""
    group_by: Literal["none", "modality_length"] = "none"
    """modality_length: each batch holds image or text-only samples of similar length; not with pack."""
    group_window: Int = 16
    """Batches read and grouped together with group_by."""
    pad_to_multiple: Int = 8
    """A batch's length is rounded up to a multiple of this."""
    num_workers: Int = 1
    """Loader worker processes per rank (0: read in the training process); each is a slot of the data split, so a
    resume needs the same number."""
    transfer_samples: Int = 32
    """Samples a worker sends per DataLoader item (batches, order and cursor do not depend on it)."""
    persistent_workers: Bool = True
    """Keep the workers from one epoch to the next."""
    pin_workers: Bool = False
    """Keep each worker on one core of this process's CPU set."""
    split: str = "train"
    """The split of each shard set to read."""
    shard_cache: str | None = None
    """Keep shards fetched from URLs (s3://, gs://, https://) in this directory across runs; default the
    MMTRAIN_SHARD_CACHE variable, else a scratch copy per epoch."""
    shard_retries: Int = 5
    """Retries of a remote shard fetch on timeouts, dropped connections and HTTP 5xx (never on 4xx)."""
    shard_backoff: Float = 1.0
    """Seconds before the first retry, doubled for each later one."""
    shard_timeout: Float = 60.0
    """Seconds a remote connection or read may stall before the try fails."""

    def check(self) -> None:
        for name, low in (("samples_per_epoch", 1), ("shuffle_buffer", 1), ("group_window", 1),
                          ("pad_to_multiple", 1), ("num_workers", 0), ("transfer_samples", 1), ("shard_retries", 0),
                          ("shard_backoff", 0)):
            at_least(self, name, low)
        if self.mode == "resampled" and self.samples_per_epoch is None:
            raise FieldError(("mode",), "resampled needs samples_per_epoch")
        if self.shard_timeout <= 0:
            raise FieldError(("shard_timeout",), f"must be > 0, not {self.shard_timeout!r}", sep=" ")


@dataclass
class StageSpec(Spec):
    """One stage of the schedule. Lengths count optimizer steps (each = grad_accum micro-batches on every rank)."""

    name: str
    """Names the stage's checkpoints (stage<I>-<name>-step<N>) and its exported weights (stages/<name>)."""
    train: TrainParts = field(default_factory=TrainParts)
    """What trains."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA adapters on the modules `lora.roles` names (train.llm: lora needs an LLM role)."""
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    """AdamW settings."""
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    """Warm-up and decay."""
    data: list[DataSource] = field(default_factory=list)
    """The data mixture: a list of {shards: DIR, weight: W}; a stage that names it replaces the previous stage's."""
    micro_batch: Int = 4
    """Samples per rank per micro-step (with pack: rows of max_length tokens)."""
    grad_accum: Int = 1
    """Micro-steps per optimizer step."""
    steps: Int = 100
    """Optimizer steps in the stage."""
    max_length: Int = 512
    """Tokens per sample, image slots included (per row with pack); longer samples follow loader.truncate."""
    pack: Bool = False
    """Fill each row with whole samples up to max_length tokens (micro_batch then counts rows)."""
    save_every: Int = 0
    """Checkpoint every N steps (0: only at the end of the stage)."""
    deepspeed: str = "ds_configs/zero3.json"
    """The DeepSpeed config file (ZeRO stage, offload); batch sizes, clipping and precision come from the recipe."""
    loader: LoaderSpec = field(default_factory=LoaderSpec)
    """How the stage's data is read."""

    def check(self) -> None:
        if not self.data:
            raise FieldError(("data",), "is empty: a stage needs a list of {shards: DIR, weight: W}", sep=" ")
        for name in ("micro_batch", "grad_accum", "steps"):
            at_least(self, name, 1)
        at_least(self, "max_length", 1)
        at_least(self, "save_every", 0)
        if self.train.llm == "lora" and not self.lora.roles:
            raise FieldError((), "train.llm: lora needs lora.roles")
        if self.pack and self.loader.group_by != "none":
            raise FieldError(("loader", "group_by"), f"{self.loader.group_by} cannot be combined with pack: true")

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size
