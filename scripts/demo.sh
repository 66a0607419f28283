#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the embedded demo on CPU (~9 minutes on 2 cores): the bundled tiny Llama learns
# the bundled letter-reversal task by SFT from imperfect demonstrations, then a reward model, PPO on that reward
# model, DPO, GRPO, rejection sampling and reward-conditioned SFT each improve on SFT. Every stage is plain
# `python -m rlhf_lightning ...` calls (printed as they run); scripts/pipeline.py chains them, evaluates every model
# with the `evaluate` command's code and prints the results table.
# Outputs: runs/tiny-<stage>/ (logs, checkpoints, HF export) and runs/demo/ (results.md/.json, reward_kl.png, eval/).
#   bash scripts/demo.sh --quick     shorter RM/PPO/GRPO stages (~7 minutes)
#   bash scripts/demo.sh --real      the real-model demo instead (scripts/real_demo.py): SmolLM2-135M-Instruct from
#                                    its GGUF file, GRPO and DPO on one-digit addition, held-out accuracy before/after
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
if [[ "${1:-}" == "--real" ]]; then
  shift
  python scripts/real_demo.py "$@"
else
  python scripts/pipeline.py "$@"
fi
