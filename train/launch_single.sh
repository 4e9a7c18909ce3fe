#!/usr/bin/env bash
# One process — a CPU, or one GPU.  The simplest way to train; also what the CPU recipes use.
#
#   train/launch_single.sh CONFIG.yaml [key=value ...]
#   train/launch_single.sh train/configs/debug.yaml train.max_steps=200 train.output_dir=runs/debug
#
# Re-running the same command with the same train.output_dir resumes from the latest complete
# checkpoint (exactly: same losses as an uninterrupted run).  PYTHON overrides the interpreter.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
exec "${PYTHON:-python}" -m mmdiff.cli train --config "$CONFIG" "$@"
