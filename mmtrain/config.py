"""Recipes: the whole training schedule as typed dataclasses, read from YAML with dotted command-line overrides.

A recipe names the model, tokenizer and template, and an ordered list of stages. Each stage states only what differs
from the stage before it: its mapping is deep-merged onto the previous stage's, so stage 2 of mPLUG-Owl reads as
"now LoRA on the LLM, vision and abstractor frozen, lr 2e-5, this data mix".
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from mmtrain.errors import UserError
from mmtrain.yamlfile import read_yaml_mapping

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"expected a number, got {value!r}") from None


@dataclass
class TrainParts:
    """What a stage trains: whole parts, LoRA on the LLM, or nothing of a part."""

    vision: bool | int = False
    """True (all), False (frozen) or N (the last N encoder layers)."""
    connector: bool = True
    llm: str = "frozen"
    """frozen | lora | full."""

    def __post_init__(self) -> None:
        if self.llm not in ("frozen", "lora", "full"):
            raise UserError(f"train.llm must be frozen, lora or full, not {self.llm!r}")


@dataclass
class LoraSpec:
    roles: list[str] = field(default_factory=list)
    """self_attn | cross_attn | ffn | vision (see mmtrain/model/lora.py for the module names of each)."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0


@dataclass
class OptimizerSpec:
    lr: float = 1e-4
    """Learning rate of every part not named in `lr_per_part`."""
    lr_per_part: dict[str, float] = field(default_factory=dict)
    """e.g. {connector: 1e-4, llm: 2e-5}: parts are vision, connector, llm (LoRA weights count under their part)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        # YAML 1.1 reads `3e-5` (no dot) as a string: take numbers however they are written.
        self.lr, self.weight_decay, self.eps, self.grad_clip = map(_number, (self.lr, self.weight_decay, self.eps,
                                                                           self.grad_clip))
        self.lr_per_part = {part: _number(v) for part, v in self.lr_per_part.items()}
        self.betas = tuple(_number(b) for b in self.betas)

    def lr_of(self, part: str) -> float:
        return float(self.lr_per_part.get(part, self.lr))


@dataclass
class ScheduleSpec:
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """Cosine decay from lr to lr × min_lr_ratio at the last step."""


@dataclass
class DataSource:
    shards: str
    weight: float = 1.0


@dataclass
class StageSpec:
    """One stage of the schedule. Lengths count optimizer steps (each = grad_accum micro-batches on every rank)."""

    name: str
    train: TrainParts = field(default_factory=TrainParts)
    lora: LoraSpec = field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    data: list[DataSource] = field(default_factory=list)
    micro_batch: int = 4
    grad_accum: int = 1
    steps: int = 100
    max_length: int = 512
    pack: bool = False
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end of the stage)."""
    log_every: int = 1
    deepspeed: str = "ds_configs/zero3.json"
    loader: dict[str, Any] = field(default_factory=dict)
    """Extra LoaderConfig fields (mode, num_workers, shuffle_buffer, samples_per_epoch, ...)."""

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError(f"stage {self.name!r}: no data (a list of {{shards: DIR, weight: W}})")
        if self.micro_batch < 1 or self.grad_accum < 1 or self.steps < 1:
            raise UserError(f"stage {self.name!r}: micro_batch, grad_accum and steps must be ≥ 1")
        if self.train.llm == "lora" and not self.lora.roles:
            raise UserError(f"stage {self.name!r}: llm: lora needs lora.roles")

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size


@dataclass
class ModelSpec:
    preset: str = "tiny"
    connector: str | None = None
    """Override the preset's connector (abstractor | xattn | layerwise | mlp)."""
    init: str | None = None
    """A VisionLanguageModel directory (save_pretrained) to start from; default: the preset's parts."""
    vision_path: str | None = None
    llm_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """Fields merged into the preset's VLMConfig (e.g. text_config: {num_hidden_layers: 2})."""


@dataclass
class FaultSpec:
    """How a run meets bad data, hangs, dead ranks and non-finite numbers (see docs/faults.md)."""

    on_bad_sample: str = "skip"
    """skip: an unreadable sample is skipped with a warning naming shard, key and reason, and counted; raise: stop."""
    max_skip_fraction: float = 0.01
    """Stop the run (exit 2) once skipped samples exceed this fraction of the samples read."""
    max_image_pixels: int = 64_000_000
    """An image whose header declares more pixels is skipped before it is decoded (decompression bombs)."""
    hang_timeout_s: float | None = None
    """No step progress on a rank for this long: hang report + non-zero exit. Default 1800 on GPU, 300 on CPU."""
    collective_timeout_s: float | None = None
    """The process group's collective timeout; default: hang_timeout_s."""
    on_nonfinite: str = "skip"
    """A NaN/Inf loss or gradient norm: skip the optimizer step (skip) or stop the run (stop)."""
    max_nonfinite_in_row: int = 3
    """This many non-finite steps in a row stop the run with a report naming the steps and sample keys."""
    keep_last: int = 0
    """Keep the newest N complete checkpoints of the run (0: keep all); the newest complete one is never deleted."""

    def __post_init__(self) -> None:
        if self.on_bad_sample not in ("skip", "raise"):
            raise UserError(f"faults.on_bad_sample must be skip or raise, not {self.on_bad_sample!r}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise UserError(f"faults.on_nonfinite must be skip or stop, not {self.on_nonfinite!r}")
        self.max_skip_fraction = _number(self.max_skip_fraction)
        if self.max_nonfinite_in_row < 1 or self.keep_last < 0:
            raise UserError("faults.max_nonfinite_in_row must be >= 1 and faults.keep_last >= 0")

    def hang_timeout(self, device_type: str) -> float:
        if self.hang_timeout_s is not None:
            return _number(self.hang_timeout_s)
        return 1800.0 if device_type == "cuda" else 300.0

    def collective_timeout(self, device_type: str) -> float:
        if self.collective_timeout_s is not None:
            return _number(self.collective_timeout_s)
        return self.hang_timeout(device_type)


@dataclass
class Recipe:
    name: str
    stages: list[StageSpec]
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: str | None = None
    template: str = "owl"
    image: dict[str, Any] = field(default_factory=dict)
    """ImageConfig fields (size defaults to the vision tower's image size)."""
    precision: str = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    gradient_checkpointing: bool | dict[str, bool] = False
    """Recompute activations in backward: true (every part), or per part: {llm: true, vision: false}."""
    kernels: str = "plain"
    """plain | liger: liger-kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy on the LLM (`pip install
    mmtrain[gpu]`; GPU only — elsewhere, or when absent, a warning and the plain modules)."""
    attention: str = "auto"
    """Self-attention over packed rows: auto (flex on CUDA, else sdpa) | sdpa (dense T×T masks) | flex (torch
    flex_attention, block-skipping; CUDA for training) | flash_varlen (variable-length flash attention; on CPU one
    call per document). See docs/train.md, Attention."""
    compile: bool = False
    """torch.compile each LLM decoder block (regional: one compiled graph reused by every block)."""
    seed: int = 0
    faults: FaultSpec = field(default_factory=FaultSpec)
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for the MFU figure; default: by GPU name (train/flops.py), none on CPU."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.kernels not in ("plain", "liger"):
            raise UserError(f"kernels must be plain or liger, not {self.kernels!r}")
        if self.attention not in ("auto", "sdpa", "flex", "flash_varlen"):
            raise UserError(f"attention must be auto, sdpa, flex or flash_varlen, not {self.attention!r}")
        self.checkpointing()
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise UserError(f"recipe {self.name!r}: stages need distinct names, got {names}")

    def checkpointing(self) -> dict[str, bool]:
        """Gradient checkpointing per part (vision, llm)."""
        value = self.gradient_checkpointing
        if isinstance(value, dict):
            unknown = set(value) - {"vision", "llm"}
            if unknown:
                raise UserError(f"gradient_checkpointing: unknown parts {sorted(unknown)} (vision, llm)")
            return {"vision": bool(value.get("vision", False)), "llm": bool(value.get("llm", False))}
        return {"vision": bool(value), "llm": bool(value)}

    def stage_index(self, name: str) -> int:
        for i, stage in enumerate(self.stages):
            if stage.name == name:
                return i
        raise UserError(f"recipe {self.name!r} has no stage {name!r} (stages: {[s.name for s in self.stages]})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """`stages.1.optimizer.lr=3e-5` → raw["stages"][1]["optimizer"]["lr"] = 3e-5 (value parsed as YAML)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key.path=value")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"--set {assignment!r}: {'.'.join(keys[:i])} has no item {key}")
            key = int(key)
        elif not isinstance(node, dict):
            raise UserError(f"--set {assignment!r}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str):
                try:
                    parsed = float(parsed)  # `3e-5`: YAML 1.1 has no such float, the user meant one
                except ValueError:
                    pass
            node[key] = parsed
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def _build(cls: type, raw: Any, where: str) -> Any:
    """Dataclass from a mapping, naming the unknown key and where it is."""
    if dataclasses.is_dataclass(cls) and isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown} (known: {sorted(fields)})")
    nested = {"train": TrainParts, "lora": LoraSpec, "optimizer": OptimizerSpec, "schedule": ScheduleSpec,
              "model": ModelSpec, "faults": FaultSpec}
    kwargs = {}
    for key, value in raw.items():
        if key in nested and fields[key].type in (nested[key].__name__, nested[key]):
            value = _build(nested[key], value, f"{where}.{key}")
        elif key == "data" and cls is StageSpec:
            value = [_build(DataSource, {"shards": v} if isinstance(v, str) else v, f"{where}.data.{i}")
                     for i, v in enumerate(value or [])]
        elif key == "betas":
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from exc


def resolve_stages(raw_stages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each stage's mapping deep-merged onto the previous stage's resolved mapping ('state only what differs')."""
    resolved: list[dict[str, Any]] = []
    for raw in raw_stages:
        if not isinstance(raw, dict) or "name" not in raw:
            raise UserError(f"every stage needs a name, got {raw!r}")
        merged = deep_merge(resolved[-1], raw) if resolved else copy.deepcopy(raw)
        if "data" in raw:
            merged["data"] = copy.deepcopy(raw["data"])  # a new mixture replaces the old one, never merges into it
        resolved.append(merged)
    return resolved


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    raw = copy.deepcopy(raw)
    stages = [_build(StageSpec, s, f"{where}: stages.{i}") for i, s in enumerate(resolve_stages(raw.pop("stages", [])))]
    return _build(Recipe, {**raw, "stages": stages}, where)


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """A recipe YAML (+ `--set key.path=value` overrides applied before the stages are resolved)."""
    raw = read_yaml_mapping(path, "recipe")
    for assignment in overrides:
        apply_override(raw, assignment)
    return recipe_from_dict(raw, str(path))
