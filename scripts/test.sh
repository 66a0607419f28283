#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU: lint, then pytest. About 15 minutes on 2 cores.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k dpo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

# torch.distributed (gloo), DeepSpeed and Ray talk over 127.0.0.1 even on one machine: check it works before the
# suite, so a sandbox with its loopback interface down fails here in seconds instead of timing out test by test.
loopback_ok() {
  python -c 'import socket; s = socket.create_server(("127.0.0.1", 0)); socket.create_connection(s.getsockname(), 5)' \
    2>/dev/null
}
if ! loopback_ok; then
  ip link set lo up 2>/dev/null || true
  loopback_ok || { echo "[test] 127.0.0.1 is unreachable (loopback interface down?): distributed tests cannot run" >&2
                   exit 1; }
  echo "[test] brought the loopback interface up"
fi

ruff check .
# stdin closed: nothing in the suite may wait for keyboard input.
python -m pytest -q -p no:cacheprovider --durations=15 tests "$@" < /dev/null
