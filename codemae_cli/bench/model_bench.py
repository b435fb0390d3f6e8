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


@dataclass
class BenchSpec:
    """One model to time: how to build it, what it reads, its analytic FLOPs per training step."""

    label: str
    build: Callable[[], object]  # a fresh model each mode, so compiled does not reuse eager's state
    inputs: tuple  # synthetic tensors already on the device
    flops: float  # per step, whole batch
    images_per_sample: int  # 2 for an optical + SAR pair, 1 for the plain MAE


@dataclass
class BenchDevice:
    """Where and in what precision the steps run, and the peak the TFLOP/s are compared with."""

    device: object  # torch.device
    name: str
    peak: Optional[float]  # dense bf16 TFLOP/s, None when unknown
    precision: str  # bf16 | fp16 | fp32
    amp: object  # the autocast dtype, None for fp32


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

    Stages: check the arguments -> device and precision -> model config -> the models to time
    (synthetic inputs) -> time each in each mode -> report.
    """
    import torch

    from codemae_cli.model.config import ModelConfig, OKDConfig

    if batch < 1 or steps < 1 or warmup < 0:
        raise UserError("--batch and --steps must be at least 1 and --warmup not negative")
    if teacher not in ("timm", "ema", "off"):
        raise UserError(f"--teacher must be timm, ema or off, not '{teacher}'")
    bd = bench_device(device, precision)
    okd = OKDConfig(enabled=teacher != "off", teacher="ema" if teacher == "off" else teacher,
                    teacher_model=teacher_model, teacher_pretrained=False)
    cfg = ModelConfig(backbone=backbone, preset=preset, img_size=img_size, patch_size=patch_size,
                      fused_attn=fused_attn, okd=okd)
    cfg.validate()
    torch.manual_seed(seed)
    modes = ["eager", "compiled"] if compile else ["eager"]
    log(f"device: {bd.name}; precision {bd.precision}; {backbone} preset {preset}; batch {batch}; "
        f"img {img_size}/{patch_size}; teacher {teacher}{' ' + teacher_model if teacher == 'timm' else ''}")
    specs = bench_specs(cfg, bd.device, batch, optical_bands, sar_bands, baseline)
    results: list[BenchResult] = []
    for spec in specs:
        for mode in modes:
            res = time_spec(spec, mode, bd, batch, warmup, steps)
            if not all(math.isfinite(v) for v in res.losses.values()):
                log(f"warning: {spec.label} {mode} produced non-finite losses {res.losses}")
            results.append(res)
            log(format_row(res))
    return {"device": bd.name, "peak_tflops": bd.peak, "precision": bd.precision,
            "config": dict(backbone=backbone, preset=preset, batch=batch, steps=steps, warmup=warmup, img_size=img_size,
                           patch_size=patch_size, optical_bands=optical_bands, sar_bands=sar_bands,
                           teacher=teacher, teacher_model=teacher_model if teacher == "timm" else None,
                           fused_attn=fused_attn, torch=torch.__version__),
            "results": results}


def bench_device(device: str, precision: str) -> BenchDevice:
    """The device, the precision (``auto``: bf16 on CUDA, fp32 elsewhere), its autocast dtype."""
    import torch

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
    return BenchDevice(device=dev, name=name, peak=peak, precision=precision, amp=amp)


def bench_specs(cfg, dev, batch: int, optical_bands: int, sar_bands: int, baseline: bool) -> list[BenchSpec]:
    """CoDe-MAE (``cfg``) and, when ``baseline``, the plain MAE of the same preset, on one
    batch of random optical and SAR tensors drawn on the device."""
    import torch

    from codemae_cli.model.codemae import build_model
    from codemae_cli.model.flops import mae_step_flops, pretrain_step_flops
    from codemae_cli.model.plain_mae import build_plain_mae

    size = cfg.img_size
    optical = torch.randn(batch, optical_bands, size, size, device=dev)
    sar = torch.randn(batch, sar_bands, size, size, device=dev)
    specs = [BenchSpec(codemae_label(cfg.backbone), lambda: build_model(cfg, optical_bands, sar_bands),
                       (optical, sar), pretrain_step_flops(cfg, optical_bands, sar_bands, batch), 2)]
    if baseline:
        specs.append(BenchSpec(
            "plain MAE",
            lambda: build_plain_mae(cfg.preset, optical_bands, size, cfg.patch_size, cfg.mask_ratio,
                                    cfg.norm_pix_loss, cfg.fused_attn),
            (optical,), mae_step_flops(cfg.preset, optical_bands, batch, size, cfg.patch_size, cfg.mask_ratio), 1))
    return specs


def time_spec(spec: BenchSpec, mode: str, bd: BenchDevice, batch: int, warmup: int, steps: int) -> BenchResult:
    """Build ``spec``'s model afresh (compiled when ``mode`` says so), time its training steps,
    and free it before the next one."""
    import torch

    dev = bd.device
    core = spec.build().to(dev).train()
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=(dev.type == "cuda") or None)
    model = torch.compile(core) if mode == "compiled" else core
    step = _make_step(model, core, optimizer, spec.inputs, bd.amp, dev, hasattr(core, "update_teacher"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        per_step, first, losses = time_training(step, dev, warmup, steps)
    except torch.OutOfMemoryError:
        raise UserError(f"{spec.label} ran out of GPU memory at batch {batch}; try a smaller --batch") from None
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    tflops = spec.flops / per_step / 1e12
    del model, core, optimizer, step
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return BenchResult(
        model=spec.label, mode=mode, batch=batch, step_s=per_step, samples_per_s=batch / per_step,
        images_per_s=spec.images_per_sample * batch / per_step, gflop_per_step=spec.flops / 1e9, tflops=tflops,
        mfu=(tflops / bd.peak) if bd.peak else None, first_step_s=first, peak_mem_gib=mem, losses=losses,
    )


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
