#!/usr/bin/env bash
# Tune the demo recipe quickly on a GPU: one shard build, then tiny-cpu.yaml under several overrides (1 GPU,
# micro-batch doubled to keep the 2-rank global batch, fp32 like the CPU demo), each evaluated on the val split with
# the demo's own evaluation (model vs grey images vs majority). Usage: bash bench/demo_sweep.sh OUT "NAME|--set a=b --set c=d" …
set -euo pipefail
out=$1; shift
py=${PYTHON:-python3}
mkdir -p "$out"
if [ ! -f "$out/mm/manifest.json" ]; then
  $py -m mmtrain shards build --spec shards/catalogs/fashion-products.yaml --catalog shards/sample/styles.csv \
      --out "$out/mm" --image-size 96 --workers 8 --no-progress > /dev/null
  $py -m mmtrain shards build --spec shards/catalogs/fashion-products.yaml --catalog shards/sample/styles.csv \
      --out "$out/text" --text-only --no-progress > /dev/null
  $py -c "from mmtrain.data.loader.tokenizer import iter_shard_texts, train_tokenizer as t; import sys
t(list(iter_shard_texts('$out/mm')) + list(iter_shard_texts('$out/text')), 1000, '$out/tok')"
fi
for spec in "$@"; do
  name=${spec%%|*}; sets=${spec#*|}
  run="$out/$name"; rm -rf "$run"
  start=$(date +%s)
  # shellcheck disable=SC2086
  $py -m deepspeed.launcher.runner --num_gpus 1 --master_port 29544 --module mmtrain.train \
      --recipe launch/recipes/tiny-cpu.yaml --out "$run" --set precision=fp32 --set "tokenizer=$out/tok" \
      $($py -c "from mmtrain.demo import data_overrides as d; from pathlib import Path as P
print(' '.join(d(P('launch/recipes/tiny-cpu.yaml'), P('$out/mm'), P('$out/text'))))") \
      --set stages.0.micro_batch=16 $sets > "$run.log" 2>&1 || { tail -n 20 "$run.log"; continue; }
  ckpt=$(ls -d "$run"/checkpoints/stage* | sort | tail -n 1)
  $py -m mmtrain export --checkpoint "$ckpt" --out "$run/model" --merge-lora > "$run.export.log" 2>&1 || { tail -n 5 "$run.export.log"; continue; }
  $py - "$run" "$out/mm" "$name" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
from mmtrain.demo import evaluate_demo
run, shards, name, secs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    q = evaluate_demo(run / "model", shards, run / "eval")
losses = [json.loads(l)["loss"] for l in open(run / "metrics.jsonl")]
cells = "  ".join(f"{k}: {v['model']:.3f}/{v['blank_images']:.3f}/{v['majority']:.3f}" for k, v in q["headline"].items())
print(f"{name:<22} {secs:>4}s loss {losses[-1]:.3f}  {cells}", flush=True)
PY
done
