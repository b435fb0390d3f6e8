#!/usr/bin/env bash
# CI step: the project installed NON-editable into a fresh virtual environment, then the README's
# commands run from an empty folder elsewhere (so nothing can come from the source tree: the
# recipes and the sample must ship with the package). Tiny settings keep it to a few minutes.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.venv-ci-installed"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$repo"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export PATH="$venv/bin:$PATH" OMP_NUM_THREADS=1 CODEMAE_CACHE="$work/cache"
codemae() { echo "+ codemae $*"; command codemae "$@"; }

codemae --version
codemae recipes
# the README's mission lines, in order, on a generated scene (tiny sizes via --set only)
codemae synth -o raw --size 256 --seed 1
cp raw/scene_optical.tif a.tif && cp raw/scene_sar.tif b.tif && cp a.tif scene.tif
codemae prepare --optical a.tif --sar b.tif --labels raw/scene_labels.tif --tile 32 --block 1 -q
tiny=(--set model.preset=tiny --set model.img_size=32 --set data.img_size=32 --set data.num_workers=0
      --set data.pin_memory=false --set run.device=cpu --set run.precision=fp32 --set run.tensorboard=false)
if codemae pretrain recipes/hr.yaml "${tiny[@]}" --set optim.max_steps=2 2>err.txt; then
    echo "pretrain recipes/hr.yaml ran without the teacher's weights file" >&2; exit 1
fi
grep -q -- "--set model.okd.teacher=ema" err.txt
codemae pretrain recipes/hr.yaml "${tiny[@]}" --set model.patch_size=8 --set model.ccl.num_heads=4 \
    --set data.augment_on=loader --set run.compile=false --set optim.batch_size=2 --set optim.max_steps=2 \
    --set model.okd.teacher=ema
codemae finetune recipes/seg.yaml --set model.img_size=32 --set data.img_size=32 --set data.num_workers=0 \
    --set data.pin_memory=false --set run.device=cpu --set run.tensorboard=false --set task.neck_dim=32 \
    --set optim.batch_size=2 --set optim.epochs=1 --set optim.max_steps=2
codemae predict scene.tif -o mask.tif -q
test -s mask.tif
codemae pretrain recipes/smoke.yaml --set optim.max_steps=2 --set run.tensorboard=false
codemae recipes hr seg && test -s recipes/hr.yaml
codemae demo -o demo
test -s demo/water.tif
echo "installed package: README commands OK"
