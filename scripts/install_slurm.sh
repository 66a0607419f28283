#!/usr/bin/env bash
# Install Slurm (slurmctld, slurmd, the client commands) and munge from the distribution's packages, for
# tests/test_slurm.py: it starts its own single-machine Slurm from them (nothing is configured or started here).
# Does nothing when Slurm is already installed; without root or apt-get it says so and leaves the machine alone
# (the Slurm tests then skip, or fail where RLHF_REQUIRE_SLURM is set, as in CI).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "[install_slurm] Slurm is not installed and this is not root with apt-get: install slurm-wlm and munge" \
       "yourself to run tests/test_slurm.py" >&2
  exit 0
fi
echo "[install_slurm] installing slurm-wlm and munge"
export DEBIAN_FRONTEND=noninteractive
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
apt() { apt-get -q -o Dpkg::Use-Pty=0 "$@" >>"$LOG" 2>&1; }  # its output only if it fails
# The package lists may be missing or stale in a fresh container: refreshed once if the first try fails.
apt install -y --no-install-recommends slurm-wlm munge ||
  { apt update && apt install -y --no-install-recommends slurm-wlm munge; } || { cat "$LOG" >&2; exit 1; }
echo "[install_slurm] $(slurmctld -V)"
