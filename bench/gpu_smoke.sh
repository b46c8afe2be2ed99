#!/usr/bin/env bash
# The CUDA path end to end on one GPU (nccl, bf16): model GPU tests, shards, tokenizer, both tiny stages under the
# DeepSpeed launcher, stop + --resume, export. Run on a GPU machine from the repo root:
#   bash bench/gpu_smoke.sh [OUT]          (wheels for deepspeed/webdataset installed beforehand where missing)
set -euo pipefail
out=${1:-/tmp/mmtrain-gpu-smoke}
rm -rf "$out"; mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi -L
$py -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
$py -m pytest -q tests/model -m gpu -p no:cacheprovider
$py -m mmtrain shards build --spec shards/catalogs/fashion-products.yaml --catalog shards/sample/styles.csv \
    --out "$out/mm" --image-size 96 --workers 8 --no-progress | tail -n 3
$py -m mmtrain shards build --spec shards/catalogs/fashion-products.yaml --catalog shards/sample/styles.csv \
    --out "$out/text" --text-only --no-progress | tail -n 1
$py -m mmtrain tokenizer train --shards "$out/mm" --vocab-size 1000 --out "$out/tok"
sets=(--set "tokenizer=$out/tok" --set "stages.0.data.0.shards=$out/mm" --set "stages.1.data.0.shards=$out/mm"
      --set "stages.1.data.1.shards=$out/text")
launch() { $py -m deepspeed.launcher.runner --num_gpus 1 --master_port 29533 --module mmtrain.train \
    --recipe launch/recipes/tiny-cpu.yaml --out "$out/run" "${sets[@]}" "$@"; }
launch --stop-after-steps 35 2>&1 | grep -vE "^\[20|FutureWarning|return func" | tail -n 4
launch --resume 2>&1 | grep -vE "^\[20|FutureWarning|return func" | tail -n 6
$py - "$out/run" <<'PY'
import json, sys
records = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
events = [json.loads(l) for l in open(f"{sys.argv[1]}/stages.jsonl")]
print("stage starts:", [(e["stage"], e["start_step"], e["precision"], e["zero_stage"]) for e in events])
for stage in ("pretrain", "instruct"):
    losses = [r["loss"] for r in records if r["stage"] == stage]
    steps = [r["step"] for r in records if r["stage"] == stage]
    print(f"{stage}: steps {steps[0]}..{steps[-1]} ({len(steps)} records), loss {losses[0]:.4f} -> {losses[-1]:.4f},"
          f" tokens/s last {records[-1]['tokens_per_s']:.0f}")
PY
ckpt=$(ls -d "$out"/run/checkpoints/stage1-* | sort | tail -n 1)
$py -m mmtrain export --checkpoint "$ckpt" --out "$out/export" 2>&1 | tail -n 1
$py - "$out" <<'PY'
import sys, torch
from mmtrain.model import VisionLanguageModel
out = sys.argv[1]
a = VisionLanguageModel.from_pretrained(f"{out}/run/stages/instruct").cuda().eval()
ids = torch.randint(4, 900, (2, 24), device="cuda")
with torch.no_grad():
    fp32 = a(input_ids=ids, labels=ids).loss.item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = a(input_ids=ids, labels=ids).loss.item()
print(f"exported model on cuda: loss fp32 {fp32:.5f} bf16-autocast {bf16:.5f} rel diff {abs(fp32 - bf16) / fp32:.2e}")
PY
