#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the embedded demo on CPU (~5 minutes on 2 cores): the bundled tiny Llama learns
# the bundled letter-reversal task by SFT from imperfect demonstrations, then a reward model, PPO on that reward
# model, DPO and GRPO each improve on SFT. Every stage is a plain `python -m rlhf_lightning fit --config
# configs/tiny/<stage>.yaml` call (printed as it runs); scripts/pipeline.py chains them and prints the results table.
# Outputs: runs/tiny-<stage>/ (logs, checkpoints, HF export) and runs/demo/ (results.md/.json, reward_kl.png).
#   bash scripts/demo.sh --quick     shorter RM/PPO/DPO/GRPO stages (~3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
python scripts/pipeline.py "$@"
