#!/usr/bin/env bash
# One-GPU pretraining throughput check (run from the repository root on a GPU machine):
#   1. a synthetic scene pair prepared into 256 px shards by the real `codemae prepare`,
#   2. `codemae bench loader` on those shards (pairs/s per worker, both augmentation modes),
#   3. model-only bench vs a short ViT-B `pretrain` from the shards, same call (benchmarks/gpu_pretrain.py).
# Environment knobs: PY (python), WORK (scratch dir), SIZE (scene px), STEPS, BATCH, WORKERS, COMPILE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
WORK=${WORK:-/tmp/codemae-gpu-pretrain}
SIZE=${SIZE:-4096}
STEPS=${STEPS:-60}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-8}
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ ! -f "$WORK/data/metadata.json" ]; then
  "$PY" -m codemae_cli synth -o "$WORK/scene" --size "$SIZE" --no-labels
  opt=$(ls "$WORK"/scene/*optical*.tif | head -1)
  sar=$(ls "$WORK"/scene/*sar*.tif | head -1)
  "$PY" -m codemae_cli prepare --optical "$opt" --sar "$sar" -o "$WORK/data" --tile 256 --split 1,0,0
fi
"$PY" -m codemae_cli bench loader --dataset "$WORK/data" --workers 1,2,4,8 --batch-size "$BATCH" --batches 20
extra=()
if [ "${COMPILE:-0}" = "1" ]; then extra+=(--compile); fi
"$PY" benchmarks/gpu_pretrain.py --data "$WORK/data" --steps "$STEPS" --batch "$BATCH" --workers "$WORKERS" \
  --out "$WORK" "${extra[@]}"
