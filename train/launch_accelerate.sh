#!/usr/bin/env bash
# `accelerate launch` with one of the configs in train/accelerate/ (GPU clusters):
#   ddp.yaml              data parallel, one process per GPU (the default)
#   fsdp.yaml             FSDP2, parameters/gradients/optimizer state sharded
#   deepspeed_zero2.yaml  DeepSpeed ZeRO-2 (optimizer state + gradients sharded; needs `deepspeed`)
#
#   train/launch_accelerate.sh CONFIG.yaml [key=value ...]
#   ACCELERATE_CONFIG=train/accelerate/fsdp.yaml NPROC=8 train/launch_accelerate.sh CONFIG.yaml
#
# Precision comes from the recipe (train.precision: fp32 | bf16), not from the accelerate file:
# mmdiff passes it to Accelerator(), which takes precedence.  NPROC overrides num_processes.
# Checkpoints under FSDP/DeepSpeed hold full weights (model.safetensors) plus accelerate's own
# sharded state in engine/; resume with the same accelerate config and process count.
# These paths are documented but not exercised in CI (no GPUs there).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: [ACCELERATE_CONFIG=file] [NPROC=N] $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ACC_CFG=${ACCELERATE_CONFIG:-$HERE/accelerate/ddp.yaml}
EXTRA=()
if [[ -n "${NPROC:-}" ]]; then
  EXTRA+=(--num_processes "$NPROC")
fi
exec "${ACCELERATE:-accelerate}" launch --config_file "$ACC_CFG" "${EXTRA[@]}" \
  -m mmdiff.cli train --config "$CONFIG" "$@"
