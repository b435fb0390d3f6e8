#!/usr/bin/env python
"""Standalone CoDe-MAE model benchmark for a bare GPU machine (needs only torch + timm).

    python benchmarks/gpu_model_bench.py                       # ViT-B and iTPN-B CoDe-MAE + ViT-B MAE, batch 128,
                                                               # ViT-L/16 teacher, eager + compiled
    python benchmarks/gpu_model_bench.py --backbone itpn       # iTPN-B only
    python benchmarks/gpu_model_bench.py --batch 256 --no-compile
    python benchmarks/gpu_model_bench.py --check-flops         # also compare the analytic FLOP count
                                                               # with torch.utils.flop_counter on the GPU
    python benchmarks/gpu_model_bench.py --device cpu --preset tiny --img-size 64 --batch 2 \
        --steps 1 --warmup 1 --no-compile --teacher ema        # smoke test without a GPU

Runs ``codemae_cli.bench.model_bench`` from this checkout without installing the package
(the GPU box may lack rasterio/geopandas/typer; the model and bench import none of them).
Prints the table and, when $OUT is set, writes it with a JSON copy to $OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check_flops(preset: str, batch: int, teacher_model: str, backbone: str = "vit") -> str:
    """Analytic training-step FLOPs vs FlopCounterMode (fused SDPA is counted on CUDA)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from codemae_cli.model.codemae import build_model
    from codemae_cli.model.config import ModelConfig, OKDConfig
    from codemae_cli.model.flops import pretrain_step_flops

    cfg = ModelConfig(backbone=backbone, preset=preset, okd=OKDConfig(teacher="timm", teacher_model=teacher_model))
    model = build_model(cfg, 3, 2).cuda()
    o = torch.randn(batch, 3, 224, 224, device="cuda")
    s = torch.randn(batch, 2, 224, 224, device="cuda")
    with FlopCounterMode(display=False) as fc:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(o, s)
        out["loss"].backward()
    counted = fc.get_total_flops()
    analytic = pretrain_step_flops(cfg, 3, 2, batch)
    return (f"FLOP check ({backbone} {preset}, batch {batch}): analytic {analytic / 1e9:.1f} GFLOP, "
            f"FlopCounterMode {counted / 1e9:.1f} GFLOP, ratio {analytic / counted:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--backbone", default="both", choices=["vit", "itpn", "both"],
                    help="both: ViT-B and iTPN-B CoDe-MAE in the same run, next to the plain ViT MAE")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--teacher", default="timm", choices=["timm", "ema", "off"])
    ap.add_argument("--teacher-model", default="vit_large_patch16_dinov3")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: a smoke test only)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--plain-attn", action="store_true", help="hand-written attention instead of SDPA")
    ap.add_argument("--check-flops", action="store_true")
    args = ap.parse_args()

    import torch

    from codemae_cli.bench.model_bench import format_report, run_model_bench

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    lines = []
    backbones = ["vit", "itpn"] if args.backbone == "both" else [args.backbone]
    if args.check_flops and torch.cuda.is_available():
        for backbone in backbones:
            line = check_flops(args.preset, 8, args.teacher_model, backbone)
            print(line)
            lines.append(line)
    report = None
    for i, backbone in enumerate(backbones):
        part = run_model_bench(
            preset=args.preset, batch=args.batch, steps=args.steps, warmup=args.warmup, device=args.device,
            compile=not args.no_compile, img_size=args.img_size, teacher=args.teacher,
            teacher_model=args.teacher_model, precision=args.precision, fused_attn=not args.plain_attn,
            backbone=backbone, baseline=i == 0,  # the plain ViT MAE once per run
        )
        if report is None:
            report = part
        else:
            report["results"] += part["results"]
    report["config"]["backbone"] = args.backbone
    table = format_report(report)
    print()
    print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model_bench.txt").write_text("\n".join(lines + [table]) + "\n")
        data = dict(report, results=[dataclasses.asdict(r) for r in report["results"]])
        (Path(out) / "model_bench.json").write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
