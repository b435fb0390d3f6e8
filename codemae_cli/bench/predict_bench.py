"""``codemae bench predict``: end-to-end whole-scene prediction against a model-only loop and
the loop a user writes by hand.

For each scene size a fresh subprocess (so its peak RSS is its own) generates a 3-band uint8
optical scene with windowed writes, builds a randomly initialised segmentation model, and then
runs three contenders over the same windows with the same model and batch, ``--repeat`` times
interleaved (medians reported, so a busy machine slows all three alike):
1. model-only: the windows as random tensors already on the device, through the model + softmax
   on one thread (what the model alone costs; end-to-end runs the softmax in its blend thread,
   beside the model, so on a machine with a spare core it can come close to or pass this rate);
2. hand-written loop: read a batch of windows, normalise, model + softmax, ``argmax``, write each
   window into a tiled GeoTIFF (no blending, no overviews, no COG);
3. end-to-end: ``predict_scene`` on the generated scene to a COG (reads, normalisation, tapered
   blending, class map, windowed writes, COG copy with overviews).
All are reported in scene Mpx/s, with their ratios and the subprocess's peak RSS, which must not
grow with the scene when memory is bounded by a band of rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codemae_cli.errors import UserError

BENCH_BANDS = 3
BENCH_CLASSES = 4


def generate_scene(path: Path, size: int, bands: int = BENCH_BANDS, block: int = 512, seed: int = 0) -> Path:
    """A ``size x size`` uint8 scene (tiled, uncompressed), written block by block (memory bounded
    by one block, so the generator does not add to the peak RSS of wide scenes)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint8", crs="EPSG:32631",
                   transform=from_origin(500000.0, 5800000.0, 0.5, 0.5), tiled=True, blockxsize=512,
                   blockysize=512, BIGTIFF="IF_SAFER")
    # GDAL's block cache (5 % of RAM by default) would keep the written scene: cap it, so the
    # generator's memory does not grow with the scene either
    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(path, "w", **profile) as ds:
        for r in range(0, size, block):
            n = min(block, size - r)
            ys = np.arange(r, r + n)[:, None]
            for c in range(0, size, block):
                m = min(block, size - c)
                xs = np.arange(c, c + m)[None, :]
                # fields of 64 px with noise: textured but cheap to generate
                base = (((ys // 64) + (xs // 64)) % 4 * 50).astype(np.uint8)
                for b in range(bands):
                    noise = rng.integers(0, 40, size=(n, m), dtype=np.uint8)
                    ds.write(base + noise + np.uint8(10 * b), b + 1, window=Window(c, r, m, n))
    return path


def build_bench_model(preset: str, bands: int, num_classes: int, img_size: int, head: str = "linear"):
    """A randomly initialised optical segmentation TaskModel (CoDe-MAE encoder of ``preset`` + head).

    Built through the same code path as fine-tuning (``codemae_cli.tasks.build_task_model``), so
    the benchmark measures the model that ``codemae predict`` runs.
    """
    from codemae_cli.tasks import build_task_model
    from codemae_cli.tasks.config import EncoderSection, FinetuneRecipe, TaskConfig

    recipe = FinetuneRecipe(
        model=EncoderSection(preset=preset, img_size=img_size, drop_path=0.0),
        task=TaskConfig(kind="segmentation", inputs="optical", head=head, from_scratch=True),
    )
    model, _ = build_task_model(recipe, optical_bands=bands, sar_bands=1, num_classes=num_classes)
    return model.eval(), f"TaskModel({preset}, {head} head, random init)"


def _peak_rss_mb() -> float:
    from codemae_cli.bench.memory import peak_rss_kb

    return peak_rss_kb() / 1024.0


@dataclass
class BenchSetup:
    """One scene, one model, the settings shared by the three contenders."""

    scene: Path
    workdir: Path
    model_fn: object
    device: object
    window: int
    overlap: int
    batch_size: int
    autocast_dtype: object
    panel_width: int
    mean: np.ndarray  # (C, 1, 1) float32, the normalisation the stats below describe
    std: np.ndarray

    @property
    def stats(self) -> dict:
        return {"optical": {"mean": self.mean.ravel().tolist(), "std": self.std.ravel().tolist()}}

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def model_only(b: BenchSetup, n_windows: int) -> float:
    """Seconds for the scene's windows as random tensors already on the device: model + softmax."""
    import torch

    from codemae_cli.infer.predict import window_probs

    x = torch.randn(b.batch_size, BENCH_BANDS, b.window, b.window, device=b.device)
    with torch.inference_mode():
        b.sync()
        t = time.perf_counter()
        done = 0
        while done < n_windows:
            k = min(b.batch_size, n_windows - done)
            p = window_probs(b.model_fn, x[:k], None, b.window, False, b.autocast_dtype)
            done += k
        p.sum().item()  # forces completion of queued kernels on any device
        b.sync()
    return time.perf_counter() - t


def plain_loop(b: BenchSetup, out: Path) -> float:
    """Seconds for the loop a user writes by hand: read a batch of windows, normalise, model + softmax,
    ``argmax``, write each window (tiled, uncompressed GeoTIFF; overlaps overwritten, no blending,
    no overviews). Same model, windows and batch as the other two contenders."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from codemae_cli.infer.predict import window_probs
    from codemae_cli.infer.windows import WindowGrid

    w = b.window
    t = time.perf_counter()
    with rasterio.open(b.scene) as src:
        grid = WindowGrid(src.height, src.width, w, b.overlap)
        starts = [(r, c) for r in grid.row_starts for c in grid.col_starts]
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, tiled=True, blockxsize=256, blockysize=256)
        with rasterio.open(out, "w", **profile) as dst:
            for i in range(0, len(starts), b.batch_size):
                chunk = starts[i : i + b.batch_size]
                # boundless (a slower VRT read) only for a scene smaller than the window
                x = np.stack([src.read(window=Window(c, r, w, w), boundless=r + w > src.height or c + w > src.width)
                              for r, c in chunk])
                x = torch.from_numpy((x.astype(np.float32) - b.mean) / b.std).to(b.device)
                with torch.inference_mode():
                    p = window_probs(b.model_fn, x, None, w, False, b.autocast_dtype)
                cls = p.argmax(1).to(torch.uint8).cpu().numpy()
                for (r, c), k in zip(chunk, cls, strict=True):
                    h, wd = min(w, src.height - r), min(w, src.width - c)
                    dst.write(k[:h, :wd], 1, window=Window(c, r, wd, h))
    b.sync()
    return time.perf_counter() - t


def end_to_end(b: BenchSetup, out: Path, instrument) -> tuple[float, dict]:
    """Seconds for ``predict_scene`` to a COG (reads, blending, class map, writes, overviews)."""
    from codemae_cli.infer.predict import predict_scene

    summary = predict_scene(b.model_fn, b.scene, None, out, window=b.window, overlap=b.overlap,
                            batch_size=b.batch_size, stats=b.stats, inputs="optical", device=b.device,
                            progress=False, panel_width=b.panel_width, instrument=instrument)
    b.sync()
    return summary["seconds"], summary


def bench_one(size: int, *, preset: str, device: str, window: int, overlap, batch_size: int, workdir: Path,
              compile: bool = False, head: str = "linear", panel_width: int | None = None,
              repeat: int = 1) -> dict:
    """One scene size, in this process: model-only, the hand-written loop and end-to-end predict,
    ``repeat`` times interleaved (medians reported, so a busy machine slows all three alike).

    ``panel_width``: predict's output columns per vertical panel (None: predict's default).
    """
    import torch

    from codemae_cli.device import resolve_device
    from codemae_cli.infer.predict import PANEL_WIDTH, PredictStats, window_probs
    from codemae_cli.infer.windows import WindowGrid, resolve_overlap

    dev = resolve_device(device)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    scene = generate_scene(workdir / f"scene_{size}.tif", size)
    gen_s = time.perf_counter() - t
    model, model_name = build_bench_model(preset, BENCH_BANDS, BENCH_CLASSES, window, head)
    model = model.to(dev)
    fn = torch.compile(model) if compile else model
    ov = resolve_overlap(window, overlap)
    b = BenchSetup(scene, workdir, lambda o, s: fn(optical=o, sar=s), dev, window, ov, batch_size,
                   torch.bfloat16 if dev.type == "cuda" else None, PANEL_WIDTH if panel_width is None else panel_width,
                   np.full((BENCH_BANDS, 1, 1), 100.0, np.float32), np.full((BENCH_BANDS, 1, 1), 50.0, np.float32))
    n_windows = len(WindowGrid(size, size, window, ov))
    with torch.inference_mode():
        for _ in range(2):  # warm-up (allocator, cuDNN/compile)
            window_probs(b.model_fn, torch.randn(batch_size, BENCH_BANDS, window, window, device=dev), None,
                         window, False, b.autocast_dtype)
    out, plain_out = workdir / f"pred_{size}.tif", workdir / f"plain_{size}.tif"
    times: dict[str, list[float]] = {"model": [], "plain": [], "e2e": []}
    for _ in range(max(1, repeat)):
        times["model"].append(model_only(b, n_windows))
        times["plain"].append(plain_loop(b, plain_out))
        pst = PredictStats()
        e2e_s, summary = end_to_end(b, out, pst)
        times["e2e"].append(e2e_s)
        out.unlink(missing_ok=True)
    model_s, plain_s, e2e_s = (float(np.median(times[k])) for k in ("model", "plain", "e2e"))
    mpx = size * size / 1e6
    result = {
        "size": size,
        "model": model_name,
        "device": str(dev),
        "window": window,
        "overlap": ov,
        "batch_size": batch_size,
        "windows": n_windows,
        "repeat": max(1, repeat),
        "generate_s": gen_s,
        "model_only_s": model_s,
        "plain_loop_s": plain_s,
        "end_to_end_s": e2e_s,
        "model_only_mpx_s": mpx / model_s,
        "plain_loop_mpx_s": mpx / plain_s,
        "end_to_end_mpx_s": mpx / e2e_s,
        "ratio": model_s / e2e_s,
        "plain_ratio": model_s / plain_s,
        "e2e_vs_plain": plain_s / e2e_s,
        "times_s": times,
        "band_rows": summary["band_rows"],
        "panel_width": b.panel_width,
        "panels": len(pst.panels),
        "acc_cols": pst.acc_cols,
        "windows_run": pst.windows_run,
        "output_bytes": summary["bytes"],
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    for p in (scene, out, plain_out):
        p.unlink(missing_ok=True)
    return result


def run_predict_bench(sizes: list[int], *, preset: str = "tiny", device: str = "auto", window: int = 512,
                      overlap=0.25, batch_size: int = 8, workdir: Path | None = None,
                      compile: bool = False, head: str = "linear", panel_width: int | None = None,
                      repeat: int = 1) -> list[dict]:
    """Run each size in its own subprocess (its own peak RSS) and collect the results."""
    if not sizes or any(s < 1 for s in sizes):
        raise UserError("--size needs at least one positive scene size")
    if window < 16 or window % 16:
        raise UserError("--window must be a positive multiple of 16 pixels")
    if repeat < 1:
        raise UserError("--repeat must be at least 1")
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="codemae-bench-predict-")) if own_tmp else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"{kind}_{size}.tif" for size in sizes for kind in ("scene", "pred", "plain")]:
        if not own_tmp and (root / name).exists():  # the bench writes and then deletes these files
            raise UserError(f"'{root / name}' exists and the bench would replace and delete it; choose another "
                            "--workdir")
    results = []
    try:
        for size in sizes:
            # scene (3 B/px) + temporary class map (1 B/px) + COG (< 1 B/px), with 20 % margin
            need = int(size * size * (BENCH_BANDS + 2) * 1.2)
            free = shutil.disk_usage(root).free
            if free < need:
                raise UserError(f"a {size} x {size} benchmark scene needs {need / 1e9:.1f} GB in '{root}' but only "
                                f"{free / 1e9:.1f} GB are free; pass a smaller --size or another --workdir")
            args = dict(size=size, preset=preset, device=device, window=window, overlap=overlap,
                        batch_size=batch_size, workdir=str(root), compile=compile, head=head,
                        panel_width=panel_width, repeat=repeat)
            proc = subprocess.run([sys.executable, "-m", "codemae_cli.bench.predict_bench", json.dumps(args)],
                                  capture_output=True, text=True, env=dict(os.environ))
            lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise UserError(f"the {size} x {size} benchmark run failed: {tail[0]}")
            results.append(json.loads(lines[-1]))
    finally:
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
    return results


def print_results(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if results:
        r0 = results[0]
        console.print(f"model: {r0['model']} on {r0['device']} ({r0['threads']} CPU threads), window {r0['window']} px, "
                      f"overlap {r0['overlap']} px, batch {r0['batch_size']}, median of {r0['repeat']} interleaved run(s)")
    table = Table(title="codemae bench predict", show_edge=False)
    for col in ("scene", "windows", "model-only", "hand loop", "end-to-end", "e2e/model", "e2e/loop", "RSS MB"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"{r['size']}^2", str(r["windows"]), f"{r['model_only_mpx_s']:.3f}", f"{r['plain_loop_mpx_s']:.3f}",
                      f"{r['end_to_end_mpx_s']:.3f}", f"{100 * r['ratio']:.1f}%", f"{r['e2e_vs_plain']:.2f}x",
                      f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    for r in results:
        console.print(f"{r['size']} x {r['size']}: end-to-end {100 * r['ratio']:.1f} % of model-only, "
                      f"{r['e2e_vs_plain']:.2f}x the hand-written loop ({100 * r['plain_ratio']:.1f} % of model-only); "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB")
    console.print("Rates in scene Mpx/s. model-only: the same windows as random tensors already on the device, "
                  "model + softmax on one thread; hand loop: read, run and write window by window (argmax, no blending, plain GeoTIFF); "
                  "end-to-end: predict to a COG with blending and overviews.")


def _worker(argv: list[str]) -> None:
    args = json.loads(argv[0])
    try:
        res = bench_one(args["size"], preset=args["preset"], device=args["device"], window=args["window"],
                        overlap=args["overlap"], batch_size=args["batch_size"], workdir=Path(args["workdir"]),
                        compile=args.get("compile", False), head=args.get("head", "linear"),
                        panel_width=args.get("panel_width"), repeat=args.get("repeat", 1))
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    _worker(sys.argv[1:])
