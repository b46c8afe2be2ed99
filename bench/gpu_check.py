"""The Python side of `bench/gpu_check.sh`: the owl-7b-shaped measurements and the command line (what the steps
share: gpu_check_shapes.py).

    python3 bench/gpu_check.py stage2 --json F [--rehearsal]   stage 2 (LoRA on the LLM): mmtrain's engine under
                                                               ZeRO-2 and ZeRO-3 against a plain HF + peft loop
    python3 bench/gpu_check.py stage1 --json F [--rehearsal]   stage 1 (vision + abstractor, LLM frozen), ZeRO-2
    python3 bench/gpu_check.py plan --out DIR --work DIR       resolve every override, count the 7B shapes (meta)
    python3 bench/gpu_check.py env | smoke --work DIR          versions; tiny-cpu.yaml end to end (gpu_check_smoke.py)
    python3 bench/gpu_check.py table --out DIR --work DIR      the final table (gpu_check_report.py)

Every mode trains the same random weights (built on the device, seeded) on the same synthetic packed batches, so
their tokens/s, MFU and peak memory compare like for like. `--rehearsal` runs the very same code on the CPU at the
tiny preset's shapes (fp32, gloo, a few steps), so that a crash shows up before GPU time is spent.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from gpu_check_shapes import (GPU, LORA_TARGETS, MODES, STAGE_INDEX, Scale, batch_facts,  # noqa: F401
                               owl_overrides, owl_recipe, peak_of, say, scale_of, synthetic_batches, write_json)


def engine_mode(recipe, index: int, config, state, device, batches, scale: Scale) -> dict[str, Any]:
    """mmtrain's path, as `Trainer.build_engine` takes it: build_stage_model + optimizer_and_schedule +
    deepspeed.initialize on the stage's DeepSpeed config; inputs through `model_inputs`."""
    import deepspeed
    import torch

    from mmtrain.model.attention import resolve_attention
    from mmtrain.train.dsconfig import deepspeed_config, zero_stage
    from mmtrain.train.flops import stage_flop_model
    from mmtrain.train.runtime import model_inputs
    from mmtrain.train.stage_model import build_stage_model, optimizer_and_schedule

    stage = recipe.stages[index]
    ds_config = deepspeed_config(stage, 1, scale.precision)
    zero3 = zero_stage(ds_config) == 3
    attention = resolve_attention(recipe.attention, device.type, packed=stage.pack)
    dtype = dtype_of(scale.precision)
    # ZeRO-3 builds partitioned on the device itself; otherwise build there directly instead of 28 GB on the CPU
    with nullcontext() if zero3 else torch.device(device):
        model, trainable = build_stage_model(config, stage, ds_config, zero3, state, 0, recipe.seed + index,
                                             recipe.checkpointing(), recipe.kernels, attention, recipe.compile)
    optimizer, scheduler, _ = optimizer_and_schedule(model, stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    flops = stage_flop_model(model, config, stage.train.vision, stage.train.connector, stage.train.llm)

    def step(batch: dict[str, Any]):
        loss = engine(**model_inputs(batch, device, dtype)).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    try:
        result = timed_loop(step, batches, scale.warmup, device, flops)
        result.update(attention=attention, zero_stage=zero_stage(ds_config), trainable=trainable,
                      skipped_steps=int(engine.skipped_steps))
    finally:
        engine.destroy()
    return result


def plain_mode(recipe, index: int, config, state, device, batches, scale: Scale) -> dict[str, Any]:
    """What a user writes without mmtrain: the same model parts in bf16, LoRA through peft directly, torch AdamW on
    the trainable parameters, HF's default attention for packed rows (sdpa with the dense document mask)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mmtrain.model import VisionLanguageModel
    from mmtrain.train.flops import stage_flop_model
    from mmtrain.train.runtime import model_inputs
    from mmtrain.train.stage_model import _no_init_weights

    stage = recipe.stages[index]
    dtype = dtype_of(scale.precision)
    with torch.device(device), _no_init_weights():
        model = VisionLanguageModel.from_config(config)
    model.load_state_dict(state)
    model.to(dtype).requires_grad_(False)
    model.set_attention("sdpa")
    lora = stage.lora
    torch.manual_seed(recipe.seed + index)
    get_peft_model(model.llm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=list(LORA_TARGETS), bias="none"))  # adapts model.llm in place
    params = [p for p in model.parameters() if p.requires_grad]
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    flops = stage_flop_model(model, config, stage.train.vision, stage.train.connector, stage.train.llm)

    def step(batch: dict[str, Any]):
        loss = model(**model_inputs(batch, device, dtype)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    result = timed_loop(step, batches, scale.warmup, device, flops)
    result.update(attention="sdpa", trainable={"llm": sum(p.numel() for p in params)},
                  adapter_dtype=str(params[0].dtype).replace("torch.", ""))
    return result


def timed_loop(step: Callable, batches: list[dict[str, Any]], warmup: int, device, flops) -> dict[str, Any]:
    """`warmup` steps (allocations, compilation), then one timed step per remaining batch, synchronized."""
    import torch

    from mmtrain.train.flops import batch_lengths

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:  # the training steps' peak, not the build's transients (an fp32 copy before the cast to bf16)
        torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    losses = [step(batch) for batch in batches[:warmup]]
    sync()
    warm_s, times = time.perf_counter() - tick, []
    start = time.perf_counter()
    for batch in batches[warmup:]:
        t = time.perf_counter()
        losses.append(step(batch))
        sync()
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    timed = batches[warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    model_flops = sum(flops.step_flops(*batch_lengths(b), int(b["pixel_values"].shape[0])) for b in timed)
    return {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            "warmup_s": warm_s, "timed_s": elapsed, "step_s": times, "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "model_flops": model_flops, "tflops": model_flops / elapsed / 1e12,
            "losses": [float(x) for x in losses]}


def dtype_of(precision: str):
    """The torch dtype of a resolved precision name."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def measure(which: str, scale: Scale, out: Path | None) -> int:
    """Every mode of `which` on the same weights and batches; the report is rewritten after each mode."""
    import torch

    from gpu_check_report import judge, mode_line, report_lines
    from mmtrain.launching import free_port
    from mmtrain.model import preset_config
    from mmtrain.train.runtime import init_distributed
    from mmtrain.train.stage_model import initial_state

    os.environ.setdefault("MASTER_PORT", str(free_port()))  # a one-process group; no clash with a step before
    _, _, device = init_distributed()
    if device.type != scale.device:
        raise SystemExit(f"{which}: this scale runs on {scale.device}, but the device here is {device.type} "
                         "(no GPU: bench/gpu_check.sh --cpu-rehearsal)")
    index = STAGE_INDEX[which]
    recipes = {2: owl_recipe(scale, which, 2), 3: owl_recipe(scale, which, 3)}
    config = preset_config(recipes[2].model.preset, recipes[2].model.vision_path, recipes[2].model.llm_path)
    batches = synthetic_batches(config, scale, scale.warmup + scale.timed)
    peak, peak_text = peak_of(device, scale)
    report: dict[str, Any] = {"step": which, "scale": asdict(scale), "stage": recipes[2].stages[index].name,
                              "overrides": {m: owl_overrides(scale, which, 2 if m != "zero3" else 3)
                                            for m in MODES[which]},
                              "peak_flops": peak, "peak": peak_text, "batches": batch_facts(batches), "modes": {}}
    say(f"{which} ({report['stage']}): {scale.preset} shapes, {scale.precision}, {device}, random weights; "
        f"{scale.rows} rows x {scale.length} tokens per step, {scale.warmup} warm-up + {scale.timed} timed steps")
    say(f"peak: {peak_text}")
    tick = time.perf_counter()
    with torch.device(device):
        state = initial_state(recipes[2], config)  # the preset's own init, seeded, built on the device
    for name in list(state):
        state[name] = state[name].to(dtype_of(scale.precision))
    report["init_s"] = time.perf_counter() - tick
    say(f"random weights on {device}: {sum(t.numel() for t in state.values()):,} values in "
        f"{report['init_s']:.1f} s")
    failed = False
    for mode in MODES[which]:
        recipe = recipes[3 if mode == "zero3" else 2]
        held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the starting weights
        tick = time.perf_counter()
        try:
            run = plain_mode if mode == "plain" else engine_mode
            result = run(recipe, index, config, state, device, batches, scale)
            if result["peak_gb"] is not None:
                result["peak_above_weights_gb"] = result["peak_gb"] - held / 1e9
            result["mfu"] = result["tflops"] * 1e12 / peak if peak else None
        except Exception as exc:  # noqa: BLE001 — one mode's failure is reported; the next mode still runs
            failed = True
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            say(f"{mode}: FAILED\n{result['traceback']}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            result["left_allocated_gb"] = (torch.cuda.memory_allocated(device) - held) / 1e9
        result["wall_s"] = time.perf_counter() - tick
        report["modes"][mode] = result
        if "error" not in result:
            say(mode_line(mode, result))
        write_json(out, report)
    report["targets"] = judge(which, report["modes"])
    write_json(out, report)
    for line in report_lines(report):
        say(line)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import gpu_check_report
    import gpu_check_smoke

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"stage2": None, "stage1": None, "env": gpu_check_smoke.env, "smoke": gpu_check_smoke.smoke,
                "plan": gpu_check_report.plan, "table": gpu_check_report.table}
    for name in commands:
        p = sub.add_parser(name)
        if name in ("smoke", "plan", "table"):
            p.add_argument("--work", type=Path, required=True, help="the work folder (shards, runs, step logs)")
        if name in ("plan", "table"):
            p.add_argument("--out", type=Path, required=True, help="the results folder")
        else:
            p.add_argument("--json", type=Path, help="write the step's report here")
        if name != "plan":
            p.add_argument("--rehearsal", action="store_true", help="CPU, tiny shapes, fp32, a few steps")
        if name == "smoke":
            p.add_argument("--steps", type=int, help="steps per stage (default: the scale's)")
    args = parser.parse_args(argv)
    if args.command in STAGE_INDEX:
        return measure(args.command, scale_of(args.rehearsal), args.json)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
