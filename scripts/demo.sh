#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the embedded demo on CPU: SFT of the bundled tiny Llama on the bundled
# addition task with DeepSpeed ZeRO-2. Outputs land in runs/tiny-sft (CSV + TensorBoard logs, checkpoints, HF export).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
python -m rlhf_lightning fit --config configs/tiny/sft.yaml "$@"
echo "Logs: runs/tiny-sft/csv (metrics.csv), runs/tiny-sft/tb (tensorboard --logdir runs/tiny-sft/tb)."
echo "Model: runs/tiny-sft/hf (AutoModelForCausalLM.from_pretrained('runs/tiny-sft/hf'))."
