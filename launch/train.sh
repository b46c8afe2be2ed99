#!/usr/bin/env bash
# Single node: one rank per GPU (or N CPU processes where there is no GPU), every argument forwarded to the trainer.
#   launch/train.sh --recipe launch/recipes/owl-7b.yaml --out runs/owl [--resume] [--set stages.1.optimizer.lr=3e-5]
# GPUS=N picks how many (default: all visible GPUs, else 2 CPU ranks); MASTER_PORT=… if 29500 is taken.
# Multi-node without SLURM: write a hostfile ("node1 slots=8" per line) and run on the first node
#   HOSTFILE=hostfile launch/train.sh --recipe … --out /shared/runs/owl
# (deepspeed starts the other nodes over passwordless ssh; --out must be on a shared filesystem).
set -euo pipefail
if [ -z "${GPUS:-}" ]; then
  GPUS=$(python3 -c "import torch; print(torch.cuda.device_count() or 2)")
fi
hosts=()
if [ -n "${HOSTFILE:-}" ]; then hosts=(--hostfile "$HOSTFILE"); fi
exec deepspeed "${hosts[@]}" --num_gpus "$GPUS" --master_port "${MASTER_PORT:-29500}" --module mmtrain.train "$@"
