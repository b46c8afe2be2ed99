"""Runtime checks: each stage's DeepSpeed config resolves against the recipe, DeepSpeed and the ops that config
needs are there, and the device, process-group backend and precision are usable."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mmtrain.doctor.context import Context, stage_label
from mmtrain.doctor.report import Check, row
from mmtrain.errors import UserError
from mmtrain.model.attention import resolve_attention
from mmtrain.train.dsconfig import deepspeed_config
from mmtrain.versions import library_versions


def _offload(config: dict[str, Any], what: str) -> str | None:
    device = (config.get("zero_optimization", {}).get(what) or {}).get("device")
    return None if device in (None, "none") else str(device)


def stage_ds_configs(ctx: Context) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """(stage label, resolved config or None, error) for every stage, as the trainer resolves them."""
    out = []
    for stage in ctx.recipe.stages:
        try:
            out.append((stage_label(stage), deepspeed_config(stage, ctx.world_size, ctx.precision), None))
        except UserError as exc:
            out.append((stage_label(stage), None, str(exc)))
    return out


def check_ds_config(ctx: Context) -> Check:
    """Every stage's config parses and its explicit batch sizes / accumulation / clipping / precision agree with the
    recipe at this world size (dsconfig.deepspeed_config), checked for all stages now rather than at each stage's
    start. Also: ZeRO-Offload of the optimizer with the trainer's client AdamW needs zero_force_ds_cpu_optimizer
    false, or deepspeed.initialize raises."""
    problems: list[tuple[str, str]] = []
    summary = []
    for where, config, error in stage_ds_configs(ctx):
        if config is None:
            problems.append(("FAIL", f"{where}: {error}"))
            continue
        stage = int(config.get("zero_optimization", {}).get("stage", 0))
        if stage not in (0, 1, 2, 3):
            problems.append(("FAIL", f"{where}: zero_optimization.stage {stage} (0-3)"))
        if _offload(config, "offload_optimizer") and config.get("zero_force_ds_cpu_optimizer", True):
            problems.append(("FAIL", f"{where}: optimizer offload with the trainer's torch AdamW makes deepspeed "
                                     f"raise; set \"zero_force_ds_cpu_optimizer\": false "
                                     f"(as ds_configs/zero3_offload.json does)"))
        summary.append(f"{where.split(' ', 1)[1]} ZeRO-{stage} batch {config['train_batch_size']}")
    return row("deepspeed config", problems, f"{ctx.world_size} rank(s), {ctx.precision}: " + ", ".join(summary))


def check_deepspeed(ctx: Context) -> Check:
    """deepspeed imports, its accelerator is the device we train on, and the compiled ops the configs need are
    compatible (`.load()`, a JIT build, only with build_ops); its version is the `versions` row's. The trainer hands
    DeepSpeed a torch AdamW, so FusedAdam / CPUAdam are never used; the only op a config can need is async_io (NVMe
    offload)."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as exc:  # noqa: BLE001 — any import failure means the trainer cannot start
        return Check("deepspeed", "FAIL", f"import deepspeed failed: {exc}; pip install -c constraints.txt -e .")
    problems: list[tuple[str, str]] = []
    version = str(deepspeed.__version__)
    accelerator = get_accelerator().device_name()
    if accelerator != ctx.device_type:
        problems.append(("FAIL", f"deepspeed's accelerator is {accelerator!r} but training runs on "
                                 f"{ctx.device_type!r}; unset DS_ACCELERATOR or make the GPUs visible"))
    needed = {"async_io" for _, config, _ in stage_ds_configs(ctx)
              if config and "nvme" in (_offload(config, "offload_optimizer"), _offload(config, "offload_param"))}
    for name in sorted(needed):
        from deepspeed.ops.op_builder import AsyncIOBuilder  # after the guarded `import deepspeed` above

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            problems.append(("FAIL", f"NVMe offload needs the {name} op, which is not compatible here "
                                     f"(libaio-dev missing?); run ds_report"))
        elif ctx.build_ops:
            try:
                builder.load(verbose=False)
            except Exception as exc:  # noqa: BLE001 — a JIT build failure, reported with its message
                problems.append(("FAIL", f"building the {name} op failed: {exc}"))
    ops = f"ops needed: {', '.join(sorted(needed))}" if needed else "no compiled ops needed (client torch AdamW)"
    built = " (built)" if ctx.build_ops and needed else ""
    return row("deepspeed", problems, f"deepspeed {version}, accelerator {accelerator}; {ops}{built}")


def check_device(ctx: Context) -> Check:
    """CUDA + NCCL (GPU) or gloo (CPU) for the process group, and the precision supported on that device."""
    problems: list[tuple[str, str]] = []
    if not dist.is_available():
        return Check("device & backend", "FAIL", "this torch build has no torch.distributed")
    if ctx.device_type == "cuda":
        backend = "nccl"
        if not torch.cuda.is_available():
            return Check("device & backend", "FAIL", f"device cuda but torch.cuda.is_available() is False (torch "
                                                    f"{torch.__version__}); check the driver / CUDA_VISIBLE_DEVICES")
        if not dist.is_nccl_available():
            problems.append(("FAIL", f"torch {torch.__version__} has no NCCL; install a CUDA build of torch"))
        if ctx.precision == "bf16" and not torch.cuda.is_bf16_supported():
            problems.append(("FAIL", f"{torch.cuda.get_device_name()} has no bf16; set precision: fp16"))
        where = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    else:
        backend = "gloo"
        if not dist.is_gloo_available():
            problems.append(("FAIL", f"torch {torch.__version__} has no gloo backend"))
        if ctx.precision == "fp16":
            problems.append(("FAIL", "fp16 training is not supported on CPU; set precision: fp32 or bf16"))
        where = "cpu"
    return row("device & backend", problems, f"{where}, {backend}, {ctx.precision}")


def check_versions(ctx: Context) -> Check:
    """The versions of torch, transformers, peft, deepspeed and webdataset, each against the range mmtrain declares
    (the tested one, see mmtrain/versions.py): outside it, a WARN naming the library, its version and the range."""
    libraries = library_versions()
    problems = [("WARN", f"{lib.name} {lib.installed or 'not installed'} is outside the tested range "
                         f"{lib.tested_text}") for lib in libraries if not lib.within]
    listed = ", ".join(f"{lib.name} {lib.installed or '-'}" for lib in libraries)
    if problems:
        problems.append(("WARN", f"installed: {listed}; the tested set: pip install -c constraints.txt -e ."))
    return row("versions", problems, f"{listed}: all within the tested ranges")


def check_attention(ctx: Context) -> Check:
    """The recipe's `attention:` can run on this device (flex trains on CUDA only; varlen needs torch's kernel on
    CUDA), and `compile: true` meets no ZeRO-3 stage (torch.compile cannot trace ZeRO-3's gathering hooks)."""
    problems: list[tuple[str, str]] = []
    chosen = set()
    for stage in ctx.recipe.stages:
        try:
            chosen.add(resolve_attention(ctx.recipe.attention, ctx.device_type, packed=stage.pack))
        except UserError as exc:
            problems.append(("FAIL", str(exc)))
            break
    if ctx.recipe.compile:
        for where, config, _ in stage_ds_configs(ctx):
            if config is not None and int(config.get("zero_optimization", {}).get("stage", 0)) == 3:
                problems.append(("FAIL", f"{where}: compile: true needs ZeRO stage 0-2, its config is ZeRO-3 "
                                         f"(use ds_configs/zero2.json there or compile: false)"))
    compiled = "decoder blocks compiled" if ctx.recipe.compile else "eager"
    return row("attention", problems, f"{ctx.recipe.attention} → {'/'.join(sorted(chosen))} on {ctx.device_type}, {compiled}")
