"""Model checks: local checkpoint directories match the preset's shapes; the disk holds a checkpoint.

Disk estimate (bytes), with p = 4 (fp32) or 2 (bf16 / fp16) and parameter counts from the meta-device model:
  checkpoint(stage) = 12 × trainable(stage) + p × total      fp32 master copy + Adam's two moments of what trains,
                                                             and the model's weights in the training precision
  export            = p × total                              the stage's final weights (LoRA merged), model dir
  need              = max over stages of checkpoint + export
FAIL when free < need, WARN when free < 2 × need, and WARN when the run's retained checkpoints (every save of every
stage with faults.keep_last 0, else keep_last + 1 of the largest) plus one export per stage exceed free space.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from mmtrain.doctor.context import Context, Unavailable, stage_label
from mmtrain.doctor.report import Check, row
from mmtrain.model import VLMConfig, preset_config
from mmtrain.model.vlm import WEIGHTS_NAME

VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                 "patch_size")
TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size")


def _hf_config(path: str, part: str) -> dict[str, Any]:
    """The checkpoint's config as a dict (AutoConfig fills defaults); the vision part of a full CLIP / SigLIP."""
    if not Path(path).is_dir():
        raise ValueError(f"model.{part}_path {path} does not exist")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model.{part}_path {path} has no config.json")
    config = AutoConfig.from_pretrained(path)
    if part == "vision":
        config = getattr(config, "vision_config", config)
    return config.to_dict()


def _mismatches(expected: dict[str, Any], found: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    return [f"{name} {found.get(name)} (preset: {expected[name]})" for name in fields
            if name in expected and name in found and found[name] != expected[name]]


def check_model_paths(ctx: Context) -> Check:
    """Each local path exists and its config.json matches the shapes the recipe's model config expects, so a wrong
    directory fails here instead of as a shape error while loading weights on rank 0."""
    spec = ctx.recipe.model
    problems: list[tuple[str, str]] = []
    if spec.init:
        try:
            VLMConfig.from_pretrained(spec.init)
            if not (Path(spec.init) / WEIGHTS_NAME).is_file():
                problems.append(("FAIL", f"model.init {spec.init} has no {WEIGHTS_NAME}"))
        except (OSError, ValueError, TypeError) as exc:
            problems.append(("FAIL", f"model.init {spec.init}: {exc}"))
        ignored = [k for k in ("connector", "config", "vision_path", "llm_path") if getattr(spec, k)]
        if ignored:
            problems.append(("WARN", f"model.init is set, so model.{', model.'.join(ignored)} are ignored "
                                     f"(the init directory's config is used)"))
        return row("model paths", problems, f"model.init {spec.init}: config and weights present")
    if not spec.vision_path and not spec.llm_path:
        return Check("model paths", "PASS", f"none (preset {spec.preset!r} from scratch)")
    if bool(spec.vision_path) != bool(spec.llm_path):
        missing = "llm_path" if spec.vision_path else "vision_path"
        problems.append(("FAIL", f"model.{missing} is unset: pretrained parts load only with both vision_path and "
                                 f"llm_path (or start from model.init)"))
    try:
        expected = ctx.model_config()
    except Unavailable:
        expected = preset_config(spec.preset, spec.vision_path, spec.llm_path)
    for part, fields, wanted in (("vision", VISION_FIELDS, expected.vision_config),
                                 ("llm", TEXT_FIELDS, expected.text_config)):
        path = getattr(spec, f"{part}_path")
        if not path:
            continue
        try:
            found = _hf_config(path, part)
        except (OSError, ValueError) as exc:
            problems.append(("FAIL", str(exc)))
            continue
        bad = _mismatches(wanted, found, fields)
        if bad:
            section = "vision_config" if part == "vision" else "text_config"
            problems.append(("FAIL", f"model.{part}_path {path}/config.json: {', '.join(bad)}; point it at the "
                                     f"preset's checkpoint or override model.config.{section}"))
    paths = ", ".join(p for p in (spec.vision_path, spec.llm_path) if p)
    return row("model paths", problems, f"{paths}: config.json shapes match preset {spec.preset!r}")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _saves(steps: int, save_every: int) -> int:
    """Checkpoints one stage writes: every save_every steps before the end, then one at the end."""
    return (steps - 1) // save_every + 1 if save_every else 1


def check_disk(ctx: Context) -> Check:
    where = _existing_ancestor(ctx.out)
    if not os.access(where, os.W_OK):
        return Check("disk space", "FAIL", f"{ctx.out}: {where} is not writable; pass --out to a writable directory")
    try:
        total = sum(p.numel() for p in ctx.meta_model().parameters())
        trainable = [sum(ctx.trainable(i).values()) for i in range(len(ctx.recipe.stages))]
    except Unavailable as exc:
        return Check("disk space", "WARN", f"not checked: {exc}")
    p = 4 if ctx.precision == "fp32" else 2
    ckpts = [12 * t + p * total for t in trainable]
    export = p * total
    need = max(ckpts) + export
    free = shutil.disk_usage(where).free
    stages = ctx.recipe.stages
    keep = ctx.recipe.faults.keep_last
    written = sum(_saves(s.steps, s.save_every) * c for s, c in zip(stages, ckpts))
    retained = (min(written, (keep + 1) * max(ckpts)) if keep else written) + len(stages) * export
    largest = stage_label(stages[ckpts.index(max(ckpts))])
    base = (f"{_gb(free)} free under {where}; one checkpoint ({largest}) {_gb(max(ckpts))} + export {_gb(export)} "
            f"= {_gb(need)}")
    problems: list[tuple[str, str]] = []
    if free < need:
        problems.append(("FAIL", f"{base}: free space or pass --out to a larger disk"))
    elif free < 2 * need:
        problems.append(("WARN", f"{base}: less than 2× headroom"))
    elif free < retained:
        problems.append(("WARN", f"{base}; but the run keeps {_gb(retained)} of checkpoints and exports "
                                 f"(faults.keep_last {keep}): set faults.keep_last"))
    return row("disk space", problems, f"{base} (run keeps up to {_gb(retained)})")
