"""The GPU check's first steps (`python3 bench/gpu_check.py env | smoke`): the device and library versions, then
tiny-cpu.yaml's stages end to end under the DeepSpeed launcher on one device, and `mmtrain export`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_check_shapes import REPO, Scale, say, scale_of, write_json

TINY_RECIPE = REPO / "launch" / "recipes" / "tiny-cpu.yaml"
NEEDED = ("shards/sample/styles.csv", "shards/catalogs/fashion-products.yaml", "launch/recipes/tiny-cpu.yaml",
          "launch/recipes/owl-7b.yaml", "ds_configs/zero2.json", "ds_configs/zero3.json")
LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "webdataset", "simplejpeg", "tokenizers", "sentencepiece",
             "safetensors", "psutil", "msgpack", "einops")
"""What the steps import; psutil, msgpack and einops because `import deepspeed` needs them."""
CRITICAL = ("torch", "transformers", "deepspeed", "peft", "webdataset")
"""Without any of these no later step can run: the check stops after `env`."""
PYPI_NAMES = {"cpuinfo": "py-cpuinfo", "yaml": "pyyaml", "google": "protobuf"}
STEPS_JUDGED_FROM = 8
"""A stage's loss is judged to have fallen only over this many steps or more (fewer are noise)."""


def rel(path: Path) -> str:
    """`path` relative to the repository where it is inside it (commands then read the same on every machine)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# ---- env -----------------------------------------------------------------------------------------------------------
def env(args: argparse.Namespace) -> int:
    """Device and library versions; a missing import is named with the wheel that provides it. Exit 2 when nothing
    else can run (no bf16 GPU, or the trainer's imports fail), 1 when only a library outside them is missing."""
    report: dict[str, Any] = {"python": platform.python_version(), "libraries": {}}
    smi = shutil.which("nvidia-smi")
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30) if smi else None
    report["nvidia_smi"] = (listing.stdout or listing.stderr).strip() if listing else "nvidia-smi: not found"
    say(report["nvidia_smi"])
    missing = []
    for name in LIBRARIES:
        try:
            report["libraries"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 — a broken install shows up here, named
            missing.append(getattr(exc, "name", None) or name)
            report["libraries"][name] = f"MISSING: {type(exc).__name__}: {exc}"
    import torch

    cuda = torch.cuda.is_available()
    report.update(torch_cuda=torch.version.cuda, cuda_available=cuda,
                  device=torch.cuda.get_device_name(0) if cuda else "cpu",
                  bf16=bool(cuda and torch.cuda.is_bf16_supported()))
    say(f"python {report['python']}, torch cuda {report['torch_cuda']}, device {report['device']}, bf16 "
        f"{report['bf16']}")
    say(", ".join(f"{k} {v}" for k, v in report["libraries"].items()))
    try:
        import mmtrain.train.engine  # noqa: F401 — the trainer's whole import graph (deepspeed, webdataset, ...)
    except Exception as exc:  # noqa: BLE001
        missing.append(getattr(exc, "name", None) or "mmtrain.train.engine")
        report["mmtrain_import"] = f"{type(exc).__name__}: {exc}"
        say(f"import mmtrain.train.engine: {report['mmtrain_import']}")
    write_json(args.json, report)
    if missing:
        names = " ".join(sorted({PYPI_NAMES.get(m.split(".")[0], m.split(".")[0]) for m in missing}))
        say(f"MISSING: {names}; build their wheels where pip has internet (../shared/gpu/wheels.sh .whl simplejpeg "
            f"{names}), carry .whl, run again")
    if not args.rehearsal and not (cuda and report["bf16"]):
        say("no CUDA device with bf16 here: the GPU check cannot run (bench/gpu_check.sh --cpu-rehearsal runs on CPU)")
        return 2
    broken = [n for n in CRITICAL if str(report["libraries"][n]).startswith("MISSING")]
    return 2 if broken or "mmtrain_import" in report else 1 if missing else 0


# ---- smoke ---------------------------------------------------------------------------------------------------------
def smoke_overrides(work: Path, scale: Scale, steps: int | None = None) -> list[str]:
    """`--set` lines for tiny-cpu.yaml: the demo's shard sets and tokenizer under `work` (`mmtrain.demo` builds them
    there), every stage shortened, packed rows (later stages inherit `pack`), attention auto, the scale's precision."""
    import yaml

    from mmtrain.demo import SHARD_SETS, data_overrides

    built = {name: work / "shards" / spec.folder for name, spec in SHARD_SETS.items()}
    stages = len(yaml.safe_load(TINY_RECIPE.read_text(encoding="utf-8"))["stages"])
    out = [f"tokenizer={work / 'tokenizer'}", *data_overrides(TINY_RECIPE, built)[1::2],
           f"precision={scale.precision}", "attention=auto", "stages.0.pack=true"]
    for i in range(stages):
        out += [f"stages.{i}.steps={steps or scale.smoke_steps}", f"stages.{i}.save_every=0"]
    return out


def trainer_command(work: Path, overrides: list[str], port: int | None = None) -> list[str]:
    """The DeepSpeed launcher on one device running `mmtrain.train` on tiny-cpu.yaml with `overrides`."""
    from mmtrain.launching import deepspeed_command

    args = ["--recipe", rel(TINY_RECIPE), "--out", str(work / "run")]
    for item in overrides:
        args += ["--set", item]
    return deepspeed_command(1, args, port=port)


def stage_summary(run: Path) -> list[dict[str, Any]]:
    """Per stage: steps, mean loss over the first and last k steps, tokens/s, and its start event's settings."""
    by_stage: dict[str, dict[int, dict[str, Any]]] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_stage.setdefault(record["stage"], {})[record["step"]] = record
    events = {e["stage"]: e for e in map(json.loads, (run / "stages.jsonl").read_text(encoding="utf-8").splitlines())}
    out = []
    for name, steps in by_stage.items():
        records = [steps[s] for s in sorted(steps)]
        losses = [r["loss"] for r in records]
        k = max(1, min(5, len(losses) // 4))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        event = events.get(name, {})
        out.append({"stage": name, "steps": len(losses), "first_loss": first, "last_loss": last,
                    "fell": (last < first) if len(losses) >= STEPS_JUDGED_FROM else None,
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:] or records),
                    **{key: event.get(key) for key in ("precision", "zero_stage", "attention")}})
    return out


def smoke(args: argparse.Namespace) -> int:
    """Shards + tokenizer (the demo's), the trainer under the DeepSpeed launcher on one device, export; checks that
    every stage ran its steps with the asked settings, that losses fell, and that the export wrote a model."""
    from mmtrain.config import load_recipe
    from mmtrain.demo import SAMPLE, build_inputs
    from mmtrain.model.attention import resolve_attention
    from mmtrain.train.checkpoint import latest_complete

    scale, work = scale_of(args.rehearsal), Path(args.work) / "smoke"
    steps = args.steps or scale.smoke_steps
    overrides = smoke_overrides(work, scale, steps)
    recipe = load_recipe(TINY_RECIPE, overrides)
    report: dict[str, Any] = {"step": "smoke", "scale": scale.name, "overrides": overrides, "checks": {}}
    tick = time.perf_counter()
    build_inputs(work, SAMPLE / "styles.csv")
    report["inputs_s"] = time.perf_counter() - tick
    command = trainer_command(work, overrides)
    say(f"train: {shlex.join(command)}")
    env_vars = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tick = time.perf_counter()
    with open(work / "train.log", "w", encoding="utf-8") as log:
        done = subprocess.run(command, env=env_vars, stdout=log, stderr=subprocess.STDOUT, check=False, cwd=REPO)
    report["train_s"], report["train_exit"] = time.perf_counter() - tick, done.returncode
    lines = (work / "train.log").read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    for line in lines:
        if line.startswith(("stage ", "mmtrain train")) or "Error" in line:
            say(f"  {line.strip()[:240]}")
    if done.returncode != 0:
        say(f"trainer exit {done.returncode}; the last lines of {work / 'train.log'}:")
        say("\n".join(lines[-40:]))
    write_json(args.json, report)
    run = work / "run"
    if (run / "metrics.jsonl").is_file() and (run / "stages.jsonl").is_file():
        report["stages"] = stage_summary(run)
    want = {"precision": scale.precision, "zero_stage": 3,
            "attention": resolve_attention(recipe.attention, scale.device, packed=True)}
    stages = {s["stage"]: s for s in report.get("stages", [])}
    report["checks"]["trained"] = done.returncode == 0 and all(
        stages.get(s.name, {}).get("steps") == steps for s in recipe.stages)
    report["checks"]["settings"] = bool(stages) and all(s[k] == v for s in stages.values() for k, v in want.items())
    report["checks"]["loss_fell"] = bool(stages) and all(s["fell"] is not False for s in stages.values())
    for s in stages.values():
        fell = "not judged (< 8 steps)" if s["fell"] is None else "fell" if s["fell"] else "DID NOT FALL"
        say(f"  {s['stage']:<9} {s['steps']:>3} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} {fell}; "
            f"{s['tokens_per_s']:,.0f} tokens/s; {s['precision']}, ZeRO-{s['zero_stage']}, attention {s['attention']}")
    say(f"  expected: {want}")
    final = latest_complete(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    report["checks"]["export"] = False
    if final is not None:
        export = [sys.executable, "-m", "mmtrain", "export", "--checkpoint", str(final.path), "--out",
                  str(work / "export"), "--merge-lora"]
        say(f"export: {shlex.join(export)}")
        tick = time.perf_counter()
        done = subprocess.run(export, capture_output=True, text=True, check=False, cwd=REPO)
        report["export_s"] = time.perf_counter() - tick
        output = (done.stdout + done.stderr).strip().splitlines()
        say("  " + "\n  ".join(output[-25:] if done.returncode else [l for l in output if l.startswith("exported")]))
        files = sorted(p.name for p in (work / "export").iterdir()) if (work / "export").is_dir() else []
        report["export_files"] = files
        report["checks"]["export"] = done.returncode == 0 and "model.safetensors" in files
    say(f"checks: {report['checks']}")
    write_json(args.json, report)
    return 0 if all(report["checks"].values()) else 1

