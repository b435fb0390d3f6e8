"""Pretraining throughput on one GPU: steady-state pairs/s of `codemae pretrain` from prepared
shards (data loading included) against the model-only bench (synthetic tensors already on the
GPU), measured in the same call with the same model, batch and precision.

    python benchmarks/gpu_pretrain.py --data /tmp/shards [--steps 60] [--batch 128] [--workers 8] [--compile]

Goal: pretraining at >= 90 % of the model-only pairs/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset directory (codemae prepare output)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--teacher-model", default="vit_large_patch16_dinov3")
    ap.add_argument("--augment-on", default="device", choices=["loader", "device"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from codemae_cli.bench.model_bench import format_report, run_model_bench
    from codemae_cli.train.pretrain import run_pretrain
    from codemae_cli.train.recipe import load_pretrain_recipe

    meta = json.loads((Path(args.data) / "metadata.json").read_text())
    co, cs = int(meta["optical"]["count"]), int(meta["sar"]["count"])
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
          f"data {args.data}: {meta['splits']} chips of {meta['tile']} px, {co} optical + {cs} SAR bands")

    # 1. model-only: the same CoDe-MAE step on tensors already on the GPU.
    report = run_model_bench(preset=args.preset, batch=args.batch, steps=20, warmup=5, compile=args.compile,
                             img_size=args.img_size,
                             optical_bands=co, sar_bands=cs, teacher="timm", teacher_model=args.teacher_model)
    print(format_report(report))
    mode = "compiled" if args.compile else "eager"
    model_only = next(r.samples_per_s for r in report["results"] if r.model == "CoDe-MAE" and r.mode == mode)

    # 2. the real command path: shards -> loader -> (device augmentation) -> DDP-ready loop.
    out = Path(args.out or tempfile.mkdtemp(prefix="codemae-gpu-pretrain-")) / "run"
    log_every = 10
    recipe = load_pretrain_recipe(Path(__file__).resolve().parents[1] / "recipes" / "hr.yaml", [
        f"data.datasets=[{args.data}]", f"data.num_workers={args.workers}", f"data.augment_on={args.augment_on}",
        f"model.preset={args.preset}", f"model.img_size={args.img_size}", f"data.img_size={args.img_size}",
        "model.okd.teacher=timm", f"model.okd.teacher_model={args.teacher_model}",
        "model.okd.teacher_weights=null", f"optim.batch_size={args.batch}", f"optim.max_steps={args.steps}",
        f"run.compile={str(args.compile).lower()}", f"run.log_every={log_every}", "run.ckpt_every=1000000",
        "run.keep_every=null", "run.tensorboard=false", "run.progress=false"])
    run_pretrain(recipe, output_dir=out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Steady state: drop the first step and the first two intervals (warm-up, compilation, cache fill).
    steady = [r["pairs_per_s"] for r in rows if r["step"] > 2 * log_every]
    if not steady:
        raise SystemExit(f"too few steps for a steady state: use --steps > {3 * log_every}")
    rate = statistics.median(steady)
    print(f"\npretrain ({mode}, {args.augment_on} augmentation, {args.workers} workers, batch {args.batch}): "
          f"{rate:,.1f} pairs/s steady state (median of {len(steady)} intervals: "
          f"{', '.join(f'{v:,.0f}' for v in steady)})")
    print(f"model-only ({mode}, same batch): {model_only:,.1f} pairs/s")
    print(f"pretrain / model-only = {100 * rate / model_only:.1f} %  (goal >= 90 %)")


if __name__ == "__main__":
    main()
