#!/usr/bin/env bash
# The trainer on one GPU, checked and measured by one command, within 6 minutes on an H200 (docs/gpu.md):
#   0 wheels + environment; 1 smoke: tiny-cpu.yaml's three stages under the DeepSpeed launcher (bf16, ZeRO-3,
#   packed, attention auto), then export; 2 owl-7b-shaped stage 2 (LoRA): mmtrain's engine under ZeRO-2 and ZeRO-3
#   against a plain HF + peft loop; 3 owl-7b-shaped stage 1 (vision + abstractor), ZeRO-2; 4 bench/attention.py.
#
#   bash bench/gpu_check.sh [OUT]                   the GPU run, from anywhere (OUT default /tmp/mmtrain-gpu-check)
#   bash bench/gpu_check.sh --dry-run [OUT]         resolve and print the plan: seconds on a CPU, writes nothing
#   bash bench/gpu_check.sh --cpu-rehearsal [OUT]   every step for real on the CPU at tiny scale (a few minutes)
#   GPU_CHECK_SKIP="attention smoke" skips steps; GPU_CHECK_TOTAL=N caps the whole GPU run at N s (default 340)
#
# OUT gets 7 flat files: gpu-check.log (this console), steps.log (every step's whole output), smoke.json,
# stage2.json, stage1.json, attention.json, summary.json. Exit 0: every step ran and every target passed; 1: a step
# failed or ran out of time; 2: usage, or no usable GPU; 3: every step ran but a target was missed (GPU run only).
set -uo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
mode=gpu out=
for arg in "$@"; do
  case "$arg" in
    --dry-run) mode=dry ;;
    --cpu-rehearsal) mode=rehearsal ;;
    -h|--help) usage ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; usage ;;
    *) [ -z "$out" ] || { echo "gpu_check.sh: one OUT folder, got $out and $arg" >&2; exit 2; }; out=$arg ;;
  esac
done
out=${out:-/tmp/mmtrain-gpu-check}
case "$out" in /*) ;; *) out=$PWD/$out ;; esac  # relative to where it was called from, not the repo
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
py=${PYTHON:-python3}
work=${TMPDIR:-/tmp}/mmtrain-gpu-check-work  # shards, runs, step logs: never in OUT, which stays flat
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -e "$out" ] && [ ! -d "$out" ]; then echo "gpu_check.sh: OUT $out exists and is not a folder" >&2; exit 2; fi
case "$out/" in "$work"/*) echo "gpu_check.sh: OUT must not be inside the work folder $work" >&2; exit 2 ;; esac

# budgets (s): each step's cap; a step also never runs past the total, which bounds the whole check
if [ "$mode" = rehearsal ]; then
  total=3000 b_wheels=120 b_env=120 b_smoke=900 b_stage2=600 b_stage1=600 b_attention=600
  flags=(--rehearsal) site=$work/site pip_extra=(--python-version 3.12 --only-binary=:all:)
  attention_args=(--device cpu --quick)
else
  total=${GPU_CHECK_TOTAL:-340} b_wheels=30 b_env=40 b_smoke=110 b_stage2=160 b_stage1=75 b_attention=60
  flags=() site=/tmp/site pip_extra=()
  attention_args=(--device cuda)
fi
noise='^\[20[0-9][0-9]-|Warning|WARNING: Running pip|warnings\.warn|^ *warn\(|forward_call\(|[0-9]%\||^ *$'

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$work/status.tsv"; }

step() {  # NAME BUDGET COMMAND...: run under `timeout` (its budget or what is left of the total), log, record
  local name=$1 budget=$2; shift 2
  if [ "$mode" = dry ]; then printf '  %-9s %4s s  %s\n' "$name" "$budget" "$*"; return 0; fi
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    echo "== $name: not run (GPU_CHECK_SKIP)"; record "$name" not-run 0 0 "$*"; return 0
  fi
  local left=$((deadline - SECONDS))
  (( budget > left )) && budget=$left
  if (( budget < 10 )); then
    echo "== $name: SKIPPED, out of time ($left s left of $total)"; record "$name" skipped 0 124 "$*"; return 124
  fi
  echo "== $name (at most $budget s): $*"
  local log=$work/logs/$name.log start=$SECONDS rc status=ok
  timeout -k 10 "$budget" "$@" > "$log" 2>&1 &
  local group=$!  # timeout leads its own process group: the launcher, the trainer, loader workers
  wait "$group"
  rc=$?
  kill -KILL -- "-$group" 2>/dev/null  # stragglers (a trainer whose SIGTERM handler saves first) hold the device
  if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=FAIL; fi
  { echo "===== $name: $status (exit $rc) after $((SECONDS - start)) s: $*"; cat "$log"; } >> "$out/steps.log"
  grep -avE "$noise" "$log" | tail -n 60
  if [ $status != ok ]; then echo "-- $name: $status (exit $rc); the last lines of its output:"; tail -n 25 "$log"; fi
  echo "-- $name: $status in $((SECONDS - start)) s"
  record "$name" "$status" "$((SECONDS - start))" "$rc" "$*"
  return $rc
}

main() {
  deadline=$((SECONDS + total))
  local wheels=(.whl/*.whl)
  if [ -e "${wheels[0]}" ]; then
    if step wheels "$b_wheels" "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${pip_extra[@]}" "${wheels[@]}" && [ "$mode" = gpu ]; then
      export PYTHONPATH="$site:$PYTHONPATH"  # the rehearsal installs them too (checks the command) but keeps its own
    fi
  else
    echo "wheels: none in .whl (deepspeed, webdataset, simplejpeg, ... must then be installed)"
  fi
  step env "$b_env" "$py" bench/gpu_check.py env --json "$work/env.json" "${flags[@]}"
  if [ $? = 2 ]; then "$py" bench/gpu_check.py table --out "$out" --work "$work" "${flags[@]}"; return 2; fi
  step stage2 "$b_stage2" "$py" bench/gpu_check.py stage2 --json "$out/stage2.json" "${flags[@]}"
  step stage1 "$b_stage1" "$py" bench/gpu_check.py stage1 --json "$out/stage1.json" "${flags[@]}"
  step smoke "$b_smoke" "$py" bench/gpu_check.py smoke --work "$work" --json "$out/smoke.json" "${flags[@]}"
  if [ -f bench/attention.py ]; then
    step attention "$b_attention" "$py" bench/attention.py "${attention_args[@]}" --json "$out/attention.json"
  else
    echo "attention: skipped: bench/attention.py missing"
    [ "$mode" = dry ] || record attention missing 0 0 "bench/attention.py missing"
  fi
  [ "$mode" = dry ] && return 0
  "$py" bench/gpu_check.py table --out "$out" --work "$work" "${flags[@]}"
}

if [ "$mode" = dry ]; then
  echo "dry run: nothing is run or written; the GPU run would write to $out"
  "$py" bench/gpu_check.py plan --out "$out" --work "$work"
  rc=$?
  echo
  echo "plan: the GPU run's steps, each under \`timeout\` (its budget, or what is left of $total s in all)"
  printf '  %-9s %6s  %s\n' step budget command
  main
  exit $rc
fi
rm -rf "$work"
mkdir -p "$work/logs" "$out" || exit 2
rm -f "$out"/{gpu-check.log,steps.log,smoke.json,stage2.json,stage1.json,attention.json,summary.json}
main 2>&1 | tee "$out/gpu-check.log"
code=${PIPESTATUS[0]}
[ "$mode" = gpu ] || [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
exit "$code"
