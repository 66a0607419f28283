#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU: lint, then pytest. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
ruff check .
python -m pytest -q -p no:cacheprovider tests "$@"
