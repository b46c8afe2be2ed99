"""The recipe's root and its recipe-wide parts: the model, images, the fault policy, and the schedule of stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from mmtrain.config.stage import StageSpec
from mmtrain.config.typed import Bool, FieldError, Float, Int, Spec, at_least, plain
from mmtrain.errors import UserError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = get_args(Precision)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""ImageConfig's default mean (mmtrain/data/loader/images.py; equal, tested)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""ImageConfig's default std (mmtrain/data/loader/images.py; equal, tested)."""

TemplateName = Literal["owl", "alpaca", "chat"]
"""The template names of mmtrain/data/loader/templates.py (TEMPLATE_NAMES; equal, tested)."""

TrackerName = Literal["tensorboard", "wandb", "mlflow"]
"""The trackers of mmtrain/train/trackers.py (TRACKERS; equal, tested)."""


@dataclass
class ModelSpec(Spec):
    """Which model: a preset, its parts from local directories, a saved model or a LLaVA, and config changes."""

    preset: str | None = None
    """A preset of mmtrain/model/presets.py (tiny, owl-7b, mmgpt-9b, pum-7b, llava-7b); none: the model is `connector`
    on the parts vision_path and llm_path describe in their own config.json."""
    connector: str | None = None
    """abstractor | xattn | layerwise | mlp: the preset's by default (its options then reset to the defaults)."""
    init: str | None = None
    """A VisionLanguageModel directory (save_pretrained) to start from; default: the preset's parts."""
    vision_path: str | None = None
    """A local vision tower directory (HF CLIP / SigLIP / ViT): its config.json describes the tower, its weights and
    preprocessor_config.json (image size, mean, std) are the first stage's."""
    llm_path: str | None = None
    """A local causal-LM directory (any family AutoModelForCausalLM loads): its config.json describes the LLM, its
    weights are the first stage's."""
    config: dict[str, Any] = field(default_factory=dict)
    """Fields merged into the preset's VLMConfig (e.g. text_config: {num_hidden_layers: 2}): a free-form HF config
    fragment, so a mapping, not a typed spec; the model config checks it when the model is built."""
    init_from_hf: str | None = None
    """A local LlavaForConditionalGeneration directory to start from: the model is its `mlp` twin (its vision and
    text configs, image token, feature layer; weights mapped by mmtrain/model/llava_layout.py), its
    preprocessor_config.json the image settings. The whole model: no preset, init, vision_path, llm_path or config
    beside it, and connector mlp if named."""

    def check(self) -> None:
        if not self.init_from_hf:
            return
        beside = [name for name in ("preset", "init", "vision_path", "llm_path", "config") if getattr(self, name)]
        if beside:
            raise FieldError(("init_from_hf",), f"cannot be combined with model.{', model.'.join(beside)}: a LLaVA "
                             "directory is the whole model (its config.json and its weights)", sep=" ")
        if self.connector not in (None, "mlp"):
            raise FieldError(("connector",), f"is {self.connector!r}, but a LLaVA (model.init_from_hf) is the mlp "
                                             "connector", sep=" ")


@dataclass
class ImageSpec(Spec):
    """How pixels reach the vision tower (mmtrain/data/loader/images.py ImageConfig; defaults equal, tested)."""

    size: Int | None = None
    """Output height and width; default: the vision tower's image_size."""
    mean: tuple[Float, Float, Float] | None = None
    """Per-channel mean the pixels are normalized with; default: the vision tower's preprocessor_config.json, else
    CLIP's."""
    std: tuple[Float, Float, Float] | None = None
    """Per-channel std; default: the vision tower's preprocessor_config.json, else CLIP's."""
    resize: Literal["shortest", "pad"] | None = None
    """shortest: scale the shortest side to size and centre-crop; pad: pad to a square with the mean colour; default:
    pad where the tower's preprocessor pads, else shortest."""
    augment: Bool = False
    """Random resized crop (scale 0.8–1), seeded per sample so a resumed run sees the same pixels."""
    hflip: Bool = False
    """Random horizontal flip, with augment only (off: flips break the text and logos on products)."""

    def check(self) -> None:
        at_least(self, "size", 1)

    def config_fields(self, tower_size: int, tower_processor: dict[str, Any] | None = None) -> dict[str, Any]:
        """ImageConfig's keyword arguments: what the recipe sets, else the tower's preprocessor settings (mean, std,
        resize), else CLIP's; the size is the tower's image_size unless the recipe sets one."""
        base = {"mean": CLIP_MEAN, "std": CLIP_STD, "resize": "shortest",
                **{k: v for k, v in (tower_processor or {}).items() if k != "size"}, "size": tower_size}
        return {**base, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                           if getattr(self, f.name) is not None}}


@dataclass
class FaultSpec(Spec):
    """How a run meets bad data, hangs, dead ranks and non-finite numbers (see docs/faults.md)."""

    on_bad_sample: Literal["skip", "raise"] = "skip"
    """skip: an unreadable sample is skipped with a warning naming shard, key and reason, and counted; raise: stop."""
    max_skip_fraction: Float = 0.01
    """Stop the run (exit 2) once skipped samples exceed this fraction of the samples read."""
    max_image_pixels: Int = 64_000_000
    """An image whose header declares more pixels is skipped before it is decoded (decompression bombs)."""
    hang_timeout_s: Float | None = None
    """No step progress on a rank for this long: hang report + non-zero exit. Default 1800 on GPU, 300 on CPU."""
    collective_timeout_s: Float | None = None
    """The process group's collective timeout; default: hang_timeout_s."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/Inf loss or gradient norm: skip the optimizer step (skip) or stop the run (stop)."""
    max_nonfinite_in_row: Int = 3
    """This many non-finite steps in a row stop the run with a report naming the steps and sample keys."""
    keep_last: Int = 0
    """Keep the newest N complete checkpoints of the run (0: keep all); the newest complete one is never deleted."""

    def check(self) -> None:
        at_least(self, "max_image_pixels", 1)
        at_least(self, "max_nonfinite_in_row", 1)
        at_least(self, "keep_last", 0)

    def hang_timeout(self, device_type: str) -> float:
        if self.hang_timeout_s is not None:
            return self.hang_timeout_s
        return 1800.0 if device_type == "cuda" else 300.0

    def collective_timeout(self, device_type: str) -> float:
        if self.collective_timeout_s is not None:
            return self.collective_timeout_s
        return self.hang_timeout(device_type)


@dataclass
class Recipe(Spec):
    """The whole training schedule: the model, its tokenizer and template, recipe-wide settings, the stages."""

    name: str
    """The recipe's name (run-report.json names it)."""
    stages: list[StageSpec]
    """The schedule, in order; each stage states only what differs from the stage before it."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The model."""
    tokenizer: str | None = None
    """The tokenizer directory (HF; <image> is added if missing); training needs one."""
    template: TemplateName = "owl"
    """The chat template every sample is rendered with (mmtrain/data/loader/templates.py): owl | alpaca | chat (the
    tokenizer's own jinja chat_template, answers + end-of-turn learned; docs/loader.md#template-chat)."""
    image: ImageSpec = field(default_factory=ImageSpec)
    """Image preprocessing."""
    precision: Precision = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    gradient_checkpointing: Bool | dict[str, Bool] = False
    """Recompute activations in backward: true (every part), or per part: {llm: true, vision: false}."""
    kernels: Literal["plain", "liger"] = "plain"
    """plain | liger: liger-kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy on the LLM (GPU only)."""
    attention: Literal["auto", "sdpa", "flex", "flash_varlen"] = "auto"
    """Self-attention over packed rows: auto (flex on CUDA, else sdpa) | sdpa | flex | flash_varlen (docs/train.md)."""
    compile: Bool = False
    """torch.compile each LLM decoder block (regional: one compiled graph reused by every block)."""
    seed: Int = 0
    """Seeds the initial weights, the data order and augmentation, and each stage's LoRA init (seed + stage)."""
    faults: FaultSpec = field(default_factory=FaultSpec)
    """The fault policy."""
    peak_tflops: Float | None = None
    """Peak TFLOP/s of one device for the MFU figure; default: by GPU name (train/flops.py), none on CPU."""
    report_to: list[TrackerName] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 sends the step scalars besides metrics.jsonl: tensorboard | wandb | mlflow ([]: metrics.jsonl
    only); wandb and mlflow are extras (pip install 'mmtrain[wandb]'), see docs/train.md."""

    def check(self) -> None:
        self.checkpointing()
        if len(set(self.report_to)) != len(self.report_to):
            raise FieldError(("report_to",), f"names a tracker twice: {self.report_to}", sep=" ")
        names = [s.name for s in self.stages]
        if not names:
            raise FieldError(("stages",), "is empty: a recipe needs at least one stage", sep=" ")
        if len(set(names)) != len(names):
            raise FieldError(("stages",), f"need distinct names, got {names}", sep=" ")

    def checkpointing(self) -> dict[str, bool]:
        """Gradient checkpointing per part (vision, llm)."""
        value = self.gradient_checkpointing
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"vision", "llm"})
            if unknown:
                raise FieldError(("gradient_checkpointing",), f"unknown parts {unknown} (vision, llm)")
            return {"vision": bool(value.get("vision", False)), "llm": bool(value.get("llm", False))}
        return {"vision": bool(value), "llm": bool(value)}

    def stage_index(self, name: str) -> int:
        for i, stage in enumerate(self.stages):
            if stage.name == name:
                return i
        raise UserError(f"recipe {self.name!r} has no stage {name!r} (stages: {[s.name for s in self.stages]})")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what a checkpoint's recipe.yaml holds)."""
        return plain(self)
