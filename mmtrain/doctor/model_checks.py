"""Model checks: local checkpoint directories describe a model mmtrain can build; the disk holds a checkpoint.

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

from mmtrain.doctor.context import Context, Unavailable, stage_label
from mmtrain.doctor.report import Check, row
from mmtrain.errors import UserError
from mmtrain.model import VLMConfig, preset_config
from mmtrain.model.checkpoint_configs import text_config_from, vision_config_from
from mmtrain.model.llava_layout import config_from_llava
from mmtrain.model.weights_io import WEIGHTS_NAME, safetensors_files

VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                 "patch_size")
TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size")


def _mismatches(published: dict[str, Any], found: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    return [f"{name} {found.get(name)} (published: {published[name]})" for name in fields
            if name in published and name in found and found[name] != published[name]]


def check_model_paths(ctx: Context) -> Check:
    """Each local checkpoint directory has a config.json that transformers reads and whose family mmtrain can build
    (the model is described by these files), so a wrong directory fails here instead of on rank 0 while loading."""
    spec = ctx.recipe.model
    problems: list[tuple[str, str]] = []
    if spec.init:
        try:
            VLMConfig.from_pretrained(spec.init)
            if not (Path(spec.init) / WEIGHTS_NAME).is_file():
                problems.append(("FAIL", f"model.init {spec.init} has no {WEIGHTS_NAME}"))
        except (OSError, ValueError, TypeError) as exc:
            problems.append(("FAIL", f"model.init {spec.init}: {exc}"))
        ignored = [k for k in ("preset", "connector", "config", "vision_path", "llm_path") if getattr(spec, k)]
        if ignored:
            problems.append(("WARN", f"model.init is set, so model.{', model.'.join(ignored)} are ignored "
                                     f"(the init directory's config is used)"))
        return row("model paths", problems, f"model.init {spec.init}: config and weights present")
    if spec.init_from_hf:
        try:
            config_from_llava(spec.init_from_hf)
            safetensors_files(spec.init_from_hf, "LLaVA")
        except UserError as exc:
            problems.append(("FAIL", str(exc)))
        return row("model paths", problems, f"model.init_from_hf {spec.init_from_hf}: a LLaVA mmtrain maps, "
                                            "weights present")
    if not spec.vision_path and not spec.llm_path:
        if not spec.preset:
            return Check("model paths", "FAIL", "model: name a preset, or a connector with vision_path and llm_path, "
                                                "or init, or init_from_hf")
        return Check("model paths", "PASS", f"none (preset {spec.preset!r} from scratch)")
    if bool(spec.vision_path) != bool(spec.llm_path):
        missing = "llm_path" if spec.vision_path else "vision_path"
        problems.append(("FAIL", f"model.{missing} is unset: pretrained parts load only with both vision_path and "
                                 f"llm_path (or start from model.init)"))
    if not spec.preset and not spec.connector:
        problems.append(("FAIL", "model.connector is unset: without a preset, name the connector"))
    published = preset_config(spec.preset) if spec.preset else None
    found_parts = []
    for part, fields, read in (("vision", VISION_FIELDS, vision_config_from), ("llm", TEXT_FIELDS, text_config_from)):
        path = getattr(spec, f"{part}_path")
        if not path:
            continue
        if not Path(path).is_dir():
            problems.append(("FAIL", f"model.{part}_path {path} does not exist"))
            continue
        try:
            found = read(path)
        except UserError as exc:
            problems.append(("FAIL", str(exc)))
            continue
        found_parts.append(f"{found['model_type']} from {path}")
        wanted = published.vision_config if published and part == "vision" else published.text_config if published \
            else {}
        bad = _mismatches(wanted, found, fields)
        if bad:
            problems.append(("WARN", f"model.{part}_path {path}/config.json: {', '.join(bad)}: not preset "
                                     f"{spec.preset!r}'s published part (the checkpoint's own config is used)"))
    if spec.vision_path and Path(spec.vision_path).is_dir():
        processor = Path(spec.vision_path) / "preprocessor_config.json"
        found_parts.append("image mean/std from its preprocessor_config.json" if processor.is_file()
                           else "no preprocessor_config.json: CLIP's image mean/std unless the recipe's image sets them")
    return row("model paths", problems, "; ".join(found_parts))


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
