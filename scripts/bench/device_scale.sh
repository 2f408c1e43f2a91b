#!/usr/bin/env bash
# The one-GPU measurements of the scale issue (docs/BENCHMARKS.md, "Estimate against measured peaks" and "GPU
# layers"), in one call of about 9 minutes on an H200, quantkit run from this checkout (the machine's own torch
# and transformers):
#   1. an MoE layer's expert solves, each alone against the pipeline's batches (Qwen3-30B-A3B's experts);
#   2. the Llama-2-7B shape, 32 layers, 128 x 2048 tokens: wall time (the issue's bound: 60 s), per-layer and
#      per-stage seconds, peaks against `quantkit estimate`; beside it the same run reading each layer when it
#      starts (QUANTKIT_PREFETCH=0);
#   3. the Llama-3-8B shape, 8 layers: its peaks against the estimate;
#   4. a Llama-2-70B-shaped slice of 3 layers with torch's allocations capped at 24 GB: it completes, its
#      per-layer time and peaks against the estimate.
#   5. the CUDA branches against their CPU twins (tests/test_cuda.py), where pytest is installed.
# Each step's table lands in $OUT (or ./device-out); a failed step does not stop the next.
#     bash scripts/bench/device_scale.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-$PWD/device-out}"
work="${WORK:-/tmp/device-scale}"
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git log -1 --format=%h 2>/dev/null | tee -a "$out/gpu.txt"

python3 scripts/bench/expert_solves.py --shape qwen3-30b-a3b --experts 32 --device cuda | tee "$out/expert_solves.jsonl"

step() {  # name, then gpu.py's arguments
  local name="$1"
  shift
  python3 scripts/bench/gpu.py --work "$work/$name" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^layer " || true
  cp "$work/$name/bench_gpu.md" "$out/$name.md" 2>/dev/null
  cp "$work/$name/bench_gpu.json" "$out/$name.json" 2>/dev/null
  rm -rf "$work/$name"/*-*l  # the checkpoint and outputs: the disk holds 64 GB
}
step llama-2-7b --shape llama-2-7b --layers 32 --tools quantkit,quantkit-noprefetch --timeout 200
step llama-3-8b --shape llama-3-8b --layers 8 --tools quantkit --timeout 120
step llama-2-70b --shape llama-2-70b --layers 3 --tools quantkit --gpu-mem-cap 24 --timeout 200
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$out/test_cuda.txt"
ls -l "$out"
