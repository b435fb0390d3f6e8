#!/usr/bin/env bash
# The GPU checks of this project in one script, for a machine with one H100/H200.
#
#   1. model bench: full CoDe-MAE step (base, batch 128, ViT-L/16-shaped teacher, bf16) on the
#      ViT-B and the paper's iTPN-B trunks vs plain MAE ViT-B, eager and compiled, in one run:
#      pairs/s, TFLOP/s, fraction of peak (torch + timm only). BACKBONE=vit|itpn|both (both).
#   2. when rasterio is importable: a generated scene prepared into shards, the loader bench,
#      a short ViT-B pretraining from the shards vs model-only in the same call, and the predict
#      bench (end-to-end vs model-only Mpx/s, peak RSS at two scene sizes).
#
# Without rasterio on the GPU box, bring wheels (see the device notes) and put them on
# PYTHONPATH before calling this script. Results are written under $OUT (or /tmp/codemae-gpu).
#   BATCH=128 STEPS=20 PREDICT_SIZES=5000,20000 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/codemae-gpu}
BATCH=${BATCH:-128}
STEPS=${STEPS:-20}
PREDICT_SIZES=${PREDICT_SIZES:-5000,20000}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"

echo "== 1. model bench (eager + compiled)"
OUT="$OUT" "$PY" benchmarks/gpu_model_bench.py --batch "$BATCH" --backbone "${BACKBONE:-both}" --check-flops 2>&1 | tee "$OUT/model_bench.txt"

if "$PY" -c "import rasterio, geopandas, typer, rich" 2>/dev/null; then
  echo "== 2. pretraining from shards vs model-only"
  WORK="$OUT/pretrain" BATCH="$BATCH" STEPS=$((STEPS * 3)) PY="$PY" bash benchmarks/gpu_pretrain.sh 2>&1 | tee "$OUT/pretrain.txt"
  echo "== 3. predict bench"
  "$PY" -m codemae_cli bench predict --size "$PREDICT_SIZES" --preset base --device cuda --window 512 \
    --batch-size 32 --workdir "$OUT/predict" 2>&1 | tee "$OUT/predict_bench.txt"
  "$PY" -m codemae_cli bench predict --size "${PREDICT_SIZES%%,*}" --preset base --device cuda --window 512 \
    --batch-size 32 --compile --workdir "$OUT/predict_c" 2>&1 | tee "$OUT/predict_bench_compiled.txt"
else
  echo "rasterio/geopandas/typer/rich missing: steps 2-3 skipped (bring wheels, see the header)" | tee "$OUT/skipped.txt"
fi
