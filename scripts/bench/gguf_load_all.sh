#!/usr/bin/env bash
# Every --gguf-type quantkit writes, loaded by llama.cpp (llama-simple) and asked for a few tokens.
#
#   scripts/bench/gguf_load_all.sh BASE WORK
#
# Each type is quantized by round-to-nearest (seconds each): GPTQ writes the same blocks, only other codes in them.
# llama.cpp's tools come from scripts/build-llama-cpp (built once, about 5 minutes on 2 cores). Exit 1 when any
# file fails to load or generate.
set -euo pipefail
base=${1:?usage: scripts/bench/gguf_load_all.sh BASE WORK}
work=${2:?usage: scripts/bench/gguf_load_all.sh BASE WORK}
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=$("$here/scripts/build-llama-cpp" | tail -n 1)
mkdir -p "$work"
failed=0
for type in $(python -c "from quantkit.config import GGUF_FILE_TYPES; print(*GGUF_FILE_TYPES)"); do
    file="$work/$type.gguf"
    quantkit quantize "$base" --format gguf --gguf-type "$type" --method rtn --out "$file" --overwrite --json >/dev/null
    if text=$("$bin/llama-simple" -m "$file" -n 16 "The capital of France is" 2>/dev/null); then
        mib=$(awk "BEGIN { printf \"%.1f\", $(stat -c %s "$file") / 1048576 }")
        printf '%-7s %6s MiB  %s\n' "$type" "$mib" "$(echo "$text" | tr '\n' ' ' | cut -c1-80)"
    else
        printf '%-7s FAILED to load or generate\n' "$type"
        failed=1
    fi
done
exit $failed
