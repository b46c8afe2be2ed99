"""The GPU check's plan (the dry run: every override resolved, the 7B shapes counted on the meta device) and its
judging and printing: each measurement's table and targets, and the final table of all steps."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any

from gpu_check_shapes import (GPU, MODE_LABELS, MODES, OWL_RECIPE, REPO, STAGE_INDEX, TARGETS, batch_facts, owl_overrides,
                              say, synthetic_batches, write_json)
from gpu_check_smoke import NEEDED, TINY_RECIPE, rel, smoke_overrides, trainer_command

GPU_PREINSTALLED = {"torch", "transformers", "peft", "tokenizers", "sentencepiece", "tensorboard", "pyyaml", "tqdm",
                    "numpy", "pillow", "packaging", "psutil", "safetensors"}
"""What the lent GPU machine has without wheels (docs/gpu.md), with transformers' and peft's own requirements."""


# ---- judging and printing --------------------------------------------------------------------------------------------
def judge(which: str, modes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of `which`: what it asks, what was measured, passed True / False (None: not measured)."""
    out = []
    plain = modes.get("plain", {}).get("tokens_per_s")
    for what, mode, least in TARGETS[which]:
        got = modes.get(mode, {})
        if what == "ratio":
            value = got["tokens_per_s"] / plain if plain and "tokens_per_s" in got else None
            text = f"{which} {MODE_LABELS[mode]}: tokens/s >= {least:.2f} x the plain loop's"
        else:
            value = got.get("mfu")
            text = f"{which} {MODE_LABELS[mode]}: MFU >= {least:.0%}"
        out.append({"target": text, "least": least, "measured": value,
                    "passed": None if value is None else value >= least})
    return out


def mode_line(mode: str, r: dict[str, Any]) -> str:
    """One mode's figures, printed as soon as it is done (the step may still run out of time after it)."""
    mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
    memory = f", peak {r['peak_gb']:.1f} GB ({r['peak_above_weights_gb']:.1f} above the held weights)" \
        if r.get("peak_gb") is not None else ""
    skipped = f", {r['skipped_steps']} optimizer steps SKIPPED (non-finite)" if r.get("skipped_steps") else ""
    return (f"{mode}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.1f} TFLOP/s, MFU {mfu}{memory}; attention "
            f"{r['attention']}; trainable {r['trainable']}; loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
            f"{skipped}; warm-up {r['warmup_s']:.1f} s, steps {min(r['step_s']):.3f}-{max(r['step_s']):.3f} s; "
            f"{r['wall_s']:.0f} s in all")


def report_lines(report: dict[str, Any]) -> list[str]:
    """The measurement's table: one row per mode, then its targets."""
    which, modes = report["step"], report["modes"]
    plain = modes.get("plain", {}).get("tokens_per_s")
    lines = [f"{which} ({report['stage']}), {report['scale']['preset']} shapes, {report['batches']['rows']} x "
             f"{report['batches']['length']} packed tokens per step, {report['scale']['precision']}; peak: "
             f"{report['peak']}",
             f"  {'mode':<26} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'x plain':>8}"]
    for mode in MODES[which]:
        r = modes.get(mode)
        if r is None or "error" in r:
            lines.append(f"  {MODE_LABELS[mode]:<26} {'not run' if r is None else 'FAILED: ' + r['error'][:80]}")
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        peak = "n/a" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}"
        ratio = f"{r['tokens_per_s'] / plain:.2f}" if plain else "-"
        lines.append(f"  {MODE_LABELS[mode]:<26} {r['tokens_per_s']:>10,.0f} {r['tflops']:>8.1f} {mfu:>6} "
                     f"{peak:>8} {ratio:>8}")
    for t in report.get("targets", []):
        shown = "not measured" if t["measured"] is None else (
            f"{t['measured']:.1%}" if "MFU" in t["target"] else f"{t['measured']:.2f} x")
        verdict = "n/a" if t["passed"] is None else "PASS" if t["passed"] else "FAIL"
        aside = " (CPU rehearsal: not judged)" if report["scale"]["name"] != "gpu" else ""
        lines.append(f"  target {t['target']}: {shown} -> {verdict}{aside}")
    return lines


# ---- plan (the dry run) --------------------------------------------------------------------------------------------
def stage_line(recipe, stage, device_type: str) -> str:
    """A resolved stage as the run will train it: length, batch shape, ZeRO stage, precision, parts, attention."""
    from mmtrain.model.attention import resolve_attention
    from mmtrain.train.dsconfig import deepspeed_config, zero_stage

    ds = deepspeed_config(stage, 1, recipe.precision)
    lora = f", LoRA {'+'.join(stage.lora.roles)} r {stage.lora.r} alpha {stage.lora.alpha}" \
        if stage.train.llm == "lora" else ""
    data = ", ".join(f"{Path(d.shards).name} {d.weight:g}" for d in stage.data)
    return (f"{stage.name}: {stage.steps} steps, {stage.micro_batch} x {stage.max_length} tokens, pack "
            f"{stage.pack}, ZeRO-{zero_stage(ds)}, bf16 {ds['bf16']['enabled']}, train vision {stage.train.vision} "
            f"connector {stage.train.connector} llm {stage.train.llm}{lora}; attention {recipe.attention} -> "
            f"{resolve_attention(recipe.attention, device_type, packed=stage.pack)} on {device_type}; data {data}")


def meta_counts(config, stage) -> tuple[dict[str, int], dict[str, int], Any]:
    """(all parameters by part, the stage's trainable ones, its FLOP model), on the meta device."""
    import torch

    from mmtrain.model import VisionLanguageModel, apply_stage_policy, parameter_counts
    from mmtrain.train.flops import stage_flop_model

    with torch.device("meta"):
        model = VisionLanguageModel.from_config(config)
        counts = parameter_counts(model)
        trainable = apply_stage_policy(model, vision=stage.train.vision, connector=stage.train.connector,
                                       llm=stage.train.llm, lora_roles=stage.lora.roles, r=stage.lora.r,
                                       alpha=stage.lora.alpha, dropout=stage.lora.dropout)
    return counts, trainable, stage_flop_model(model, config, stage.train.vision, stage.train.connector,
                                               stage.train.llm)


def wheel_lines() -> list[str]:
    """The wheels in .whl, and deepspeed's own requirements that neither they nor the GPU machine provide."""
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    lines = [f"wheels: {len(wheels)} in .whl: {', '.join(sorted(names)) or 'none (the GPU machine needs them all)'}"]
    deepspeed = next((w for w in wheels if w.name.startswith("deepspeed-")), None)
    if deepspeed is not None:
        with zipfile.ZipFile(deepspeed) as wheel:
            meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
            needs = {re.split(r"[<>=!~ ;\[(]", line.split(":", 1)[1].strip())[0].lower().replace("_", "-")
                     for line in wheel.read(meta).decode().splitlines()
                     if line.startswith("Requires-Dist:") and "extra ==" not in line}
        absent = sorted(needs - names - GPU_PREINSTALLED)
        if absent:
            lines.append(f"WARN: deepspeed requires {', '.join(absent)}: in no wheel of .whl nor preinstalled on the "
                         "GPU machine (import deepspeed needs einops and msgpack); build them first: "
                         f"../shared/gpu/wheels.sh .whl simplejpeg {' '.join(absent)}")
    return lines


def plan(args: argparse.Namespace) -> int:
    """Everything the GPU run will resolve, resolved here: files, overrides, recipes, 7B shapes, FLOPs per step."""
    from mmtrain.config import load_recipe
    from mmtrain.errors import UserError
    from mmtrain.model import preset_config
    from mmtrain.train.flops import PEAK_TFLOPS, batch_lengths

    scale, work, problems = GPU, Path(args.work), []
    missing = [f for f in NEEDED if not (REPO / f).is_file()]
    problems += [f"missing file {f}" for f in missing]
    say(f"files: {'all present' if not missing else 'MISSING ' + ', '.join(missing)} ({', '.join(NEEDED)})")
    for line in wheel_lines():
        say(line)
    say(f"bench/attention.py: {'present' if (REPO / 'bench' / 'attention.py').is_file() else 'missing (skipped)'}")
    say(f"work folder {work} (recreated by the run); results in {args.out}")
    say(f"\n[smoke] {rel(TINY_RECIPE)} + overrides:")
    overrides = smoke_overrides(work / "smoke", scale)
    for item in overrides:
        say(f"  --set {item}")
    try:
        recipe = load_recipe(TINY_RECIPE, overrides)
        say(f"  resolved: precision {recipe.precision}, attention {recipe.attention}, tokenizer {recipe.tokenizer}")
        for stage in recipe.stages:
            say(f"  {stage_line(recipe, stage, scale.device)}")
        say(f"  command: {shlex.join(trainer_command(work / 'smoke', overrides, port=29533))}")
    except UserError as exc:
        problems.append(f"smoke: {exc}")
        say(f"  ERROR {exc}")
    for which in ("stage2", "stage1"):
        say(f"\n[{which}] {rel(OWL_RECIPE)} stage {STAGE_INDEX[which]}, modes {', '.join(MODES[which])}; overrides:")
        for zero in ((2, 3) if "zero3" in MODES[which] else (2,)):
            items = owl_overrides(scale, which, zero)
            say(f"  ZeRO-{zero}: {' '.join(items)}")
            try:
                recipe = load_recipe(OWL_RECIPE, items)
                say(f"  resolved: model {recipe.model.preset} (vision_path {recipe.model.vision_path}, llm_path "
                    f"{recipe.model.llm_path}), precision {recipe.precision}, gradient_checkpointing "
                    f"{recipe.gradient_checkpointing}, compile {recipe.compile}")
                say(f"  {stage_line(recipe, recipe.stages[STAGE_INDEX[which]], scale.device)}")
            except UserError as exc:
                problems.append(f"{which} ZeRO-{zero}: {exc}")
                say(f"  ERROR {exc}")
    if problems:
        say("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    recipe = load_recipe(OWL_RECIPE, owl_overrides(scale, "stage2", 2))
    config = preset_config(recipe.model.preset)
    batches = synthetic_batches(config, scale, scale.warmup + scale.timed)
    facts = batch_facts(batches)
    say(f"\n[{scale.preset} on the meta device] image slots {config.num_image_slots()}, image "
        f"{config.vision_config['image_size']} px, LLM vocabulary {config.text_config['vocab_size']}")
    peak = PEAK_TFLOPS["H200"][scale.precision] * 1e12
    for which in ("stage2", "stage1"):
        least = next(at_least for what, _, at_least in TARGETS[which] if what == "mfu")
        stage = recipe.stages[STAGE_INDEX[which]]
        counts, trainable, flops = meta_counts(config, stage)
        if which == "stage2":
            say("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        per_batch = [flops.step_flops(*batch_lengths(b), int(b["pixel_values"].shape[0])) for b in batches]
        mean = sum(per_batch) / len(per_batch)
        tokens = sum(facts["tokens_per_batch"]) / len(per_batch)
        say(f"{which} ({stage.name}) trainable: " + ", ".join(f"{k} {v:,}" for k, v in trainable.items()))
        say(f"{which} model FLOPs per step: {mean / 1e12:.1f} TFLOP (mean of {len(per_batch)} batches); at "
            f"{least:.0%} MFU of the H200's {peak / 1e12:.1f} TFLOP/s: {least * peak / mean * tokens:,.0f} tokens/s, "
            f"{mean / (least * peak):.3f} s per step")
    say(f"batches: {facts['count']} x {facts['rows']} rows x {facts['length']} tokens; real tokens "
        f"{facts['tokens_per_batch']}; documents {facts['documents_per_batch']}; images {facts['images_per_batch']}")
    return 0


# ---- the final table -----------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    """A step's report, or None where the step wrote none (it failed early or never ran)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def table(args: argparse.Namespace) -> int:
    """Every step's status and figures, every target's verdict; summary.json; the exit code (docs/gpu.md)."""
    out, work = Path(args.out), Path(args.work)
    steps = []
    if (work / "status.tsv").is_file():
        for line in (work / "status.tsv").read_text(encoding="utf-8").splitlines():
            name, status, seconds, code, command = line.split("\t", 4)
            steps.append({"step": name, "status": status, "seconds": int(seconds), "exit": int(code),
                          "command": command})
    environment = read_json(work / "env.json") or {}
    reports = {n: read_json(out / f"{n}.json") for n in ("smoke", "stage2", "stage1", "attention")}
    libs = environment.get("libraries", {})
    say(f"\n==== mmtrain GPU check ({'CPU rehearsal' if args.rehearsal else 'GPU'}): {environment.get('device', '?')}; "
        + ", ".join(f"{k} {libs.get(k, '?')}" for k in ("torch", "transformers", "deepspeed", "peft")))
    say(f"{'step':<10} {'status':<8} {'seconds':>7}  command")
    for s in steps:
        say(f"{s['step']:<10} {s['status']:<8} {s['seconds']:>7}  {s['command'][:150]}")
    smoke_report = reports["smoke"] or {}
    for s in smoke_report.get("stages", []):
        fell = "n/a" if s["fell"] is None else "fell" if s["fell"] else "DID NOT FALL"
        say(f"smoke {s['stage']:<9} {s['steps']:>3} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} "
            f"({fell}), {s['tokens_per_s']:,.0f} tokens/s, {s['precision']}, ZeRO-{s['zero_stage']}, "
            f"attention {s['attention']}")
    if smoke_report:
        say(f"smoke checks: {smoke_report.get('checks')}")
    targets = []
    for which in ("stage2", "stage1"):
        if reports[which]:
            reports[which].setdefault("targets", judge(which, reports[which].get("modes", {})))
            targets += reports[which]["targets"]
            for line in report_lines(reports[which]):
                say(line)
    attention = (reports["attention"] or {}).get("target")
    if attention:
        verdict = "n/a" if attention.get("passed") is None else "PASS" if attention["passed"] else "FAIL"
        measured = attention.get("measured")
        shown = "not measured" if measured is None else f"{measured:.2f} x"
        say(f"attention: flex over dense sdpa {shown} at {attention.get('tokens')} tokens, "
            f"{attention.get('documents')} documents (target >= {attention.get('required')}) -> {verdict}")
        targets.append({"target": "attention flex vs dense", **attention})
    failed_steps = [s["step"] for s in steps if s["status"] not in ("ok", "missing", "not-run")]
    missed = [t["target"] for t in targets if t.get("passed") is False]
    code = 1 if failed_steps else 3 if missed and not args.rehearsal else 0
    say(f"failed steps: {failed_steps or 'none'}; targets missed: {missed or 'none'}"
        f"{' (not judged in a CPU rehearsal)' if args.rehearsal and missed else ''}; exit {code}")
    write_json(out / "summary.json", {"steps": steps, "env": environment, "targets": targets, "exit": code,
                                      "mode": "cpu-rehearsal" if args.rehearsal else "gpu",
                                      **{n: r for n, r in reports.items() if r is not None}})
    return code

