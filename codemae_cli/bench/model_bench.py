"""Model benchmark: a full CoDe-MAE training step next to a plain MAE of the same size.

    codemae bench model --preset base --batch 128 [--backbone itpn] [--compile] [--device cuda]
                        [--steps N] [--teacher-model vit_large_patch16_dinov3]

Synthetic data already on the device; each step is forward + backward + AdamW step (+ the EMA
update for EMA teachers). Throughput is turned into TFLOP/s with the analytic FLOP count
(:mod:`codemae_cli.model.flops`) and into a fraction of the device's dense bf16 peak.
Imports only torch and timm (no rasterio, typer or rich), so it also runs from
``benchmarks/gpu_model_bench.py`` on a bare GPU machine.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from codemae_cli.device import resolve_device
from codemae_cli.errors import UserError

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; the first match wins.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("V100", 125.0),
]


def device_peak(device) -> tuple[str, Optional[float]]:
    """(device name, dense bf16 peak TFLOP/s or None when unknown, e.g. CPUs)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_TFLOPS:
            if key.lower() in name.lower():
                return name, peak
        return name, None
    return f"{device.type} ({torch.get_num_threads()} threads)", None


@dataclass
class BenchResult:
    model: str
    mode: str  # eager | compiled
    batch: int
    step_s: float
    samples_per_s: float  # pairs/s for CoDe-MAE, images/s for the plain MAE
    images_per_s: float  # images through the encoder per second (2 per pair)
    gflop_per_step: float
    tflops: float
    mfu: Optional[float]
    first_step_s: float  # includes compilation when compiled
    peak_mem_gib: Optional[float] = None
    losses: dict = field(default_factory=dict)




def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(step: Callable[[], dict], device, warmup: int, steps: int) -> tuple[float, float, dict]:
    """(seconds per step over ``steps`` timed steps, seconds of the first step, last losses)."""
    _sync(device)
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        out = step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    _sync(device)
    per_step = (time.perf_counter() - t0) / steps
    losses = {k: float(v) for k, v in out.get("losses", {}).items()}
    return per_step, first, losses


def _make_step(model, core, optimizer, inputs: tuple, autocast_dtype, device, update_teacher: bool):
    import torch

    def step() -> dict:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(*inputs)
        out["loss"].backward()
        optimizer.step()
        if update_teacher:
            core.update_teacher()
        return {"losses": {k: v.detach() for k, v in out["losses"].items()}}

    return step


def run_model_bench(preset: str = "base", batch: int = 128, steps: int = 10, warmup: int = 3,
                    device: str = "auto", compile: bool = False, img_size: int = 224, patch_size: int = 16,
                    optical_bands: int = 3, sar_bands: int = 2, teacher: str = "timm",
                    teacher_model: str = "vit_large_patch16_dinov3", precision: str = "auto",
                    fused_attn: bool = True, seed: int = 0, log: Callable[[str], None] = print,
                    backbone: str = "vit", baseline: bool = True) -> dict:
    """Time CoDe-MAE and the plain MAE baseline (eager, and compiled when ``compile``).

    ``backbone`` picks CoDe-MAE's trunk (vit | itpn; results are labelled "CoDe-MAE" and
    "CoDe-MAE iTPN"); the plain MAE (``baseline``) is always the ViT of the same preset name.

    Returns {"device", "peak_tflops", "precision", "config", "results": [BenchResult, ...]}.
    """
    import torch

    from codemae_cli.model.codemae import build_model
    from codemae_cli.model.config import ModelConfig, OKDConfig
    from codemae_cli.model.flops import mae_step_flops, pretrain_step_flops
    from codemae_cli.model.plain_mae import build_plain_mae

    if batch < 1 or steps < 1 or warmup < 0:
        raise UserError("--batch and --steps must be at least 1 and --warmup not negative")
    if teacher not in ("timm", "ema", "off"):
        raise UserError(f"--teacher must be timm, ema or off, not '{teacher}'")
    dev = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--precision must be auto, bf16, fp16 or fp32, not '{precision}'")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name, peak = device_peak(dev)
    okd = OKDConfig(enabled=teacher != "off", teacher="ema" if teacher == "off" else teacher,
                    teacher_model=teacher_model, teacher_pretrained=False)
    cfg = ModelConfig(backbone=backbone, preset=preset, img_size=img_size, patch_size=patch_size,
                      fused_attn=fused_attn, okd=okd)
    cfg.validate()
    torch.manual_seed(seed)
    gen_inputs = dict(device=dev)
    optical = torch.randn(batch, optical_bands, img_size, img_size, **gen_inputs)
    sar = torch.randn(batch, sar_bands, img_size, img_size, **gen_inputs)
    modes = ["eager", "compiled"] if compile else ["eager"]
    log(f"device: {name}; precision {precision}; {backbone} preset {preset}; batch {batch}; img {img_size}/{patch_size}; "
        f"teacher {teacher}{' ' + teacher_model if teacher == 'timm' else ''}")

    specs = [
        (codemae_label(backbone), lambda: build_model(cfg, optical_bands, sar_bands), (optical, sar),
         pretrain_step_flops(cfg, optical_bands, sar_bands, batch), 2),
    ]
    if baseline:
        specs.append(("plain MAE", lambda: build_plain_mae(preset, optical_bands, img_size, patch_size, cfg.mask_ratio,
                                                           cfg.norm_pix_loss, fused_attn), (optical,),
                      mae_step_flops(preset, optical_bands, batch, img_size, patch_size, cfg.mask_ratio), 1))
    results: list[BenchResult] = []
    for label, build, inputs, flops, images_per_sample in specs:
        for mode in modes:
            core = build().to(dev).train()
            fused = dev.type == "cuda"
            params = [p for p in core.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                          fused=fused or None)
            model = torch.compile(core) if mode == "compiled" else core
            step = _make_step(model, core, optimizer, inputs, amp, dev, hasattr(core, "update_teacher"))
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                per_step, first, losses = time_training(step, dev, warmup, steps)
            except torch.OutOfMemoryError:
                raise UserError(f"{label} ran out of GPU memory at batch {batch}; try a smaller --batch") from None
            mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            tflops = flops / per_step / 1e12
            res = BenchResult(
                model=label, mode=mode, batch=batch, step_s=per_step, samples_per_s=batch / per_step,
                images_per_s=images_per_sample * batch / per_step, gflop_per_step=flops / 1e9, tflops=tflops,
                mfu=(tflops / peak) if peak else None, first_step_s=first, peak_mem_gib=mem, losses=losses,
            )
            if not all(math.isfinite(v) for v in losses.values()):
                log(f"warning: {label} {mode} produced non-finite losses {losses}")
            results.append(res)
            log(format_row(res))
            del model, core, optimizer, step
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"device": name, "peak_tflops": peak, "precision": precision,
            "config": dict(backbone=backbone, preset=preset, batch=batch, steps=steps, warmup=warmup, img_size=img_size,
                           patch_size=patch_size, optical_bands=optical_bands, sar_bands=sar_bands,
                           teacher=teacher, teacher_model=teacher_model if teacher == "timm" else None,
                           fused_attn=fused_attn, torch=torch.__version__),
            "results": results}


def codemae_label(backbone: str) -> str:
    return "CoDe-MAE" if backbone == "vit" else "CoDe-MAE iTPN"


def format_row(r: BenchResult) -> str:
    unit = "pairs/s" if r.model.startswith("CoDe-MAE") else "img/s"
    mfu = f"{100 * r.mfu:5.1f} % of peak" if r.mfu is not None else "peak unknown"
    mem = f", {r.peak_mem_gib:.1f} GiB" if r.peak_mem_gib is not None else ""
    return (f"{r.model:<13} {r.mode:<8} step {1000 * r.step_s:9.1f} ms  {r.samples_per_s:9.1f} {unit:<7} "
            f"{r.gflop_per_step:10.1f} GFLOP/step  {r.tflops:8.3f} TFLOP/s  {mfu}"
            f"  (first step {r.first_step_s:.1f} s{mem})")


def format_report(report: dict) -> str:
    """A plain-text table of all results plus the CoDe-MAE / plain MAE ratios per mode."""
    lines = [f"device: {report['device']}  peak: "
             f"{report['peak_tflops'] if report['peak_tflops'] else 'unknown'} TFLOP/s (dense bf16)  "
             f"precision: {report['precision']}"]
    header = f"{'model':<13} {'mode':<8} {'step ms':>9} {'samples/s':>10} {'img/s':>9} {'GFLOP/step':>11} " \
             f"{'TFLOP/s':>9} {'of peak':>8}"
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        mfu = f"{100 * r.mfu:7.1f}%" if r.mfu is not None else f"{'n/a':>8}"
        lines.append(f"{r.model:<13} {r.mode:<8} {1000 * r.step_s:9.1f} {r.samples_per_s:10.1f} "
                     f"{r.images_per_s:9.1f} {r.gflop_per_step:11.1f} {r.tflops:9.3f} {mfu}")
    by = {(r.model, r.mode): r for r in report["results"]}
    for label in ("CoDe-MAE", "CoDe-MAE iTPN"):
        for mode in ("eager", "compiled"):
            a, b = by.get((label, mode)), by.get(("plain MAE", mode))
            if a and b:
                lines.append(f"{mode}: {label} step = {a.step_s / b.step_s:.2f} x plain-MAE step at the same batch; "
                             f"{a.tflops / b.tflops:.2f} x its TFLOP/s")
    lines.append("samples = pairs for CoDe-MAE (2 images each), images for the plain MAE")
    return "\n".join(lines)
