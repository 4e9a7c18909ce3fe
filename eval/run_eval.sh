#!/usr/bin/env bash
# Run `mmdiff eval` with the pinned config of a task, on one process or several (torchrun).
#
#   eval/run_eval.sh TASK MODEL_DIR DATA_DIR OUT_DIR [more mmdiff eval arguments / key=value]
#   NPROC=4 eval/run_eval.sh vqa runs/shapes/model data/shapes/test runs/shapes/eval/vqa
#   eval/run_eval.sh t2i runs/shapes/model data/shapes/test out/t2i --fid-weights pt_inception.pth
#
# TASK: vqa | digits | caption | describe | t2i | text (config: eval/configs/TASK.yaml, or CONFIG=file).
# Re-running the same command resumes; NPROC>1 shards the items over processes (rank 0 writes
# the metrics).  PYTHON / TORCHRUN choose the interpreters.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: [NPROC=N] [CONFIG=file.yaml] $0 TASK MODEL_DIR DATA_DIR OUT_DIR [args ...]" >&2
  exit 2
fi
TASK=$1 MODEL=$2 DATA=$3 OUT=$4
shift 4
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/$TASK.yaml}
ARGS=(eval --task "$TASK" --model "$MODEL" --data "$DATA" --out "$OUT" --config "$CONFIG" "$@")
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node "$NPROC" -m mmdiff.cli "${ARGS[@]}"
fi
exec "${PYTHON:-python}" -m mmdiff.cli "${ARGS[@]}"
