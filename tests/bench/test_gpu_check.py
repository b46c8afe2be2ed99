"""`bench/gpu_check.sh --dry-run` on the CPU: every recipe override the GPU run passes still resolves to the intended
stages, the owl-7b shapes count what LLaMA-7B + CLIP ViT-L/14 + the abstractor count, and the plan lists every step
within the 6-minute bound; and the synthetic batches keep the loader's packed-batch contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp("gpu-check")
    out, tmp = root / "out", root / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, out, tmp / "mmtrain-gpu-check-work"


def lines_after(stdout: str, header: str) -> list[str]:
    block = stdout.split(header, 1)[1]
    return block.split("\n\n", 1)[0].splitlines()


def test_writes_nothing(dry_run):
    stdout, out, work = dry_run
    assert stdout.startswith(f"dry run: nothing is run or written; the GPU run would write to {out}\n")
    assert not out.exists() and not work.exists()
    assert "files: all present" in stdout and "PROBLEMS" not in stdout


def test_smoke_overrides_resolve(dry_run):
    stdout, _, work = dry_run
    smoke = work / "smoke"
    sets = [line.strip().removeprefix("--set ") for line in lines_after(stdout, "[smoke]") if "--set " in line
            and "command:" not in line]
    assert sets == [f"tokenizer={smoke}/tokenizer",
                    f"stages.0.data.0.shards={smoke}/shards/text-only",
                    f"stages.0.data.1.shards={smoke}/shards/text-only-qa",
                    f"stages.1.data.0.shards={smoke}/shards/multimodal-qa",
                    f"stages.2.data.0.shards={smoke}/shards/multimodal",
                    f"stages.2.data.1.shards={smoke}/shards/multimodal-qa",
                    f"stages.2.data.2.shards={smoke}/shards/text-only",
                    "precision=bf16", "attention=auto", "stages.0.pack=true",
                    *[f"stages.{i}.{key}" for i in range(3) for key in ("steps=24", "save_every=0")]]
    assert f"resolved: precision bf16, attention auto, tokenizer {smoke}/tokenizer" in stdout
    assert ("lm: 24 steps, 8 x 192 tokens, pack True, ZeRO-3, bf16 True, train vision False connector False llm "
            "full; attention auto -> flex on cuda; data text-only 0.4, text-only-qa 0.6") in stdout
    assert ("pretrain: 24 steps, 16 x 192 tokens, pack True, ZeRO-3, bf16 True, train vision True connector True "
            "llm full; attention auto -> flex on cuda; data multimodal-qa 1") in stdout
    assert ("instruct: 24 steps, 16 x 192 tokens, pack True, ZeRO-3, bf16 True, train vision False connector False "
            "llm lora, LoRA self_attn+ffn r 8 alpha 16; attention auto -> flex on cuda; data multimodal 0.2, "
            "multimodal-qa 0.5, text-only 0.3") in stdout
    command = next(line for line in lines_after(stdout, "[smoke]") if "command:" in line)
    assert ("-m deepspeed.launcher.runner --num_gpus 1 --master_port 29533 --module mmtrain.train --recipe "
            f"launch/recipes/tiny-cpu.yaml --out {smoke}/run --set tokenizer=") in command


def test_owl_overrides_resolve(dry_run):
    stdout, _, _ = dry_run
    common = ("model.preset=owl-7b model.vision_path=null model.llm_path=null precision=bf16 attention=auto "
              "gradient_checkpointing=false")
    for zero in (2, 3):
        assert (f"  ZeRO-{zero}: {common} stages.1.micro_batch=4 stages.1.grad_accum=1 stages.1.max_length=2048 "
                f"stages.1.pack=true stages.1.steps=9 stages.1.deepspeed=ds_configs/zero{zero}.json") in stdout
        assert (f"instruct: 9 steps, 4 x 2048 tokens, pack True, ZeRO-{zero}, bf16 True, train vision False "
                "connector False llm lora, LoRA self_attn+ffn r 8 alpha 32; attention auto -> flex on cuda") in stdout
    assert (f"  ZeRO-2: {common} stages.0.micro_batch=4 stages.0.grad_accum=1 stages.0.max_length=2048 "
            "stages.0.pack=true stages.0.steps=9 stages.0.deepspeed=ds_configs/zero2.json") in stdout
    assert ("pretrain: 9 steps, 4 x 2048 tokens, pack True, ZeRO-2, bf16 True, train vision True connector True "
            "llm frozen; attention auto -> flex on cuda") in stdout
    assert stdout.count("resolved: model owl-7b (vision_path None, llm_path None), precision bf16, "
                        "gradient_checkpointing False, compile False") == 3


def test_owl_7b_shapes(dry_run):
    stdout, _, _ = dry_run
    assert "image slots 65, image 224 px, LLM vocabulary 32000" in stdout
    assert ("parameters: vision 303,179,776, connector 81,473,536, llm 6,738,415,616, total 7,123,068,928"
            in stdout)  # LLaMA-7B: 6.74 B (vocabulary 32,000, untied head)
    assert "stage2 (instruct) trainable: vision 0, connector 0, llm 19,988,480" in stdout  # r 8 on 7 x 32 linears
    assert "stage1 (pretrain) trainable: vision 303,177,728, connector 81,473,536, llm 0" in stdout
    assert "batches: 9 x 4 rows x 2048 tokens; real tokens [8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192]" \
        in stdout
    for which, mfu in (("stage2", 51), ("stage1", 40)):
        found = re.search(rf"{which} model FLOPs per step: ([\d.]+) TFLOP .* at {mfu}% MFU of the H200's 989.4 TFLOP/s",
                          stdout)
        assert found and 200 < float(found[1]) < 260, stdout  # ~4 x 6.6 G x 8,192 tokens (frozen LLM, grads flow)


def test_plan_lists_every_step_within_six_minutes(dry_run):
    stdout, out, work = dry_run
    plan = stdout.split("plan: the GPU run's steps", 1)[1]
    total = int(re.search(r"what is left of (\d+) s in all", plan)[1])
    assert total <= 345  # + the final table and the 10 s kill grace: under 6 minutes
    steps = {m[1]: (int(m[2]), m[3]) for m in re.finditer(r"^  (\w+) +(\d+) s  (.*)$", plan, re.M)}
    names = [n for n in ("wheels", "env", "stage2", "stage1", "smoke", "attention") if n in steps]
    assert names == list(steps) and {"env", "smoke", "stage2", "stage1"} <= set(names)
    assert steps["env"] == (40, f"{sys.executable} bench/gpu_check.py env --json {work}/env.json")
    assert steps["smoke"] == (110, f"{sys.executable} bench/gpu_check.py smoke --work {work} --json {out}/smoke.json")
    assert steps["stage2"] == (160, f"{sys.executable} bench/gpu_check.py stage2 --json {out}/stage2.json")
    assert steps["stage1"] == (75, f"{sys.executable} bench/gpu_check.py stage1 --json {out}/stage1.json")
    if (REPO / "bench" / "attention.py").is_file():
        assert steps["attention"] == (60, f"{sys.executable} bench/attention.py --device cuda --json "
                                          f"{out}/attention.json")
    else:
        assert "attention: skipped: bench/attention.py missing" in plan
    if "wheels" in steps:
        assert steps["wheels"][1].startswith(f"{sys.executable} -m pip install -q --no-index --no-deps --no-compile "
                                             "--no-cache-dir --upgrade --target /tmp/site .whl/")


def test_synthetic_batches_keep_the_packed_contract():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check_shapes as gpu_check
    from mmtrain.model import preset_config

    config = preset_config("tiny")
    scale = gpu_check.REHEARSAL
    for batch in gpu_check.synthetic_batches(config, scale, 3):
        ids, segments, positions = batch["input_ids"], batch["segment_ids"], batch["position_ids"]
        assert tuple(ids.shape) == (scale.rows, scale.length) and bool(batch["attention_mask"].all())
        assert len(batch["image_slots"]) == len(batch["pixel_values"]) >= 1
        for row, start in batch["image_slots"].tolist():
            assert bool((ids[row, start:start + 65] == config.image_token_id).all())
        assert int((ids == config.image_token_id).sum()) == 65 * len(batch["pixel_values"])
        starts = segments[:, 1:] != segments[:, :-1]
        assert bool((positions[:, 1:][starts] == 0).all()) and bool((positions[:, 0] == 0).all())
        lengths = [int(n) for row in segments for n in row.bincount()[1:]]
        assert min(lengths) >= scale.doc_min and sum(lengths) == scale.rows * scale.length
