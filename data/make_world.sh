#!/usr/bin/env bash
# Write every split of the embedded Shapes world plus the real digits set as webdataset shards.
#   bash data/make_world.sh [OUT=data/out] [TRAIN=20000] [SEED=0] [IMAGE_SIZE=32]
# Deterministic: the same arguments give byte-identical shards.
set -euo pipefail
OUT=${1:-data/out}
TRAIN=${2:-20000}
SEED=${3:-0}
SIZE=${4:-32}
MMDIFF=${MMDIFF:-mmdiff}
$MMDIFF data shapes --out "$OUT/shapes/train"   --split train   --num-samples "$TRAIN" --seed "$SEED" --image-size "$SIZE"
$MMDIFF data shapes --out "$OUT/shapes/val"     --split val     --num-samples 500      --seed "$SEED" --image-size "$SIZE"
$MMDIFF data shapes --out "$OUT/shapes/test"    --split test    --num-samples 1000     --seed "$SEED" --image-size "$SIZE"
$MMDIFF data shapes --out "$OUT/shapes/heldout" --split heldout --num-samples 500      --seed "$SEED" --image-size "$SIZE"
$MMDIFF data digits --out "$OUT/digits" --image-size "$SIZE" --seed "$SEED"
$MMDIFF data tokenizer --data "$OUT/shapes/train" "$OUT/digits/train" --out "$OUT/text-tokenizer"
$MMDIFF data inspect "$OUT/shapes/train"
