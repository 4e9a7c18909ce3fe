#!/usr/bin/env bash
# N processes on this machine (or on several) with torchrun; accelerate picks up the torchrun
# environment (NCCL on GPUs, gloo on CPUs).  train.batch_size is the GLOBAL batch: it must be
# divisible by (number of processes × train.grad_accum_steps).
#
#   NPROC=8 train/launch_torchrun.sh CONFIG.yaml [key=value ...]
#   # two nodes, run on each with its NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 train/launch_torchrun.sh CONFIG.yaml
#
# Environment: NPROC (default: number of visible GPUs, else 2), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python).
# Resume needs the same number of processes (RNG states are saved per rank).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: [NPROC=N] $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
PY=${PYTHON:-python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec "$PY" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m mmdiff.cli train --config "$CONFIG" "$@"
