"""``codemae bench prepare``: prepare vs a plain rasterio read + warp + write, same data, same run.

A synthetic pair is generated (optical 4 bands uint16 on EPSG:32631; SAR 2 bands float32
linear power on another CRS), then each contender runs in its own Python subprocess so its
peak resident memory (``ru_maxrss`` of the process and its workers) is its own:

* prepare: ``run_prepare`` with the default options (tile, stride = tile, no quick-look);
* baseline: the minimum any chipper must do -- for each band of ``tile`` rows, read the
  optical window, read the SAR window through a ``WarpedVRT`` onto the optical grid
  (bilinear), and write both to uncompressed GeoTIFFs, windowed.

Printed: wall and CPU time, chips/s, MB/s of input data (uncompressed), peak RSS (VmHWM of
the process; with workers, the largest worker's ru_maxrss), and the ratios.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# Shared by both contenders: peak-RSS reader, arguments, clock start.
_PROLOGUE = r"""
import json, resource, sys, time
from codemae_cli.bench.memory import peak_rss_kb as hwm
a = json.loads(sys.argv[1])

def start_clocks():
    # after each contender's imports, so both are timed on their work alone
    _r = resource.getrusage(resource.RUSAGE_SELF)
    a["cpu0"] = _r.ru_utime + _r.ru_stime
    return time.perf_counter()
"""

_PREPARE = _PROLOGUE + r"""
from codemae_cli.data.prepare import run_prepare
t = start_clocks()
s = run_prepare(out=a["out"], optical=[a["optical"]], sar=[a["sar"]], tile=a["tile"], workers=a["workers"],
                sar_scale="linear", quicklook=False, overwrite=True)
wall = time.perf_counter() - t
me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime - a["cpu0"]
print(json.dumps({"wall": wall, "cpu": cpu, "chips": s["chips"], "rss_kb": max(hwm(), ch.ru_maxrss if a["workers"] > 1 else 0)}))
"""

_BASELINE = _PROLOGUE + r"""
import numpy as np, rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
t = start_clocks()
with rasterio.open(a["optical"]) as opt, rasterio.open(a["sar"]) as sar:
    with WarpedVRT(sar, crs=opt.crs, transform=opt.transform, width=opt.width, height=opt.height,
                   resampling=Resampling.bilinear, nodata=float("nan")) as vrt:
        prof = dict(driver="GTiff", width=opt.width, height=opt.height, crs=opt.crs, transform=opt.transform,
                    tiled=True, blockxsize=256, blockysize=256, dtype="float32")
        with rasterio.open(a["out"] + "_opt.tif", "w", count=opt.count, **prof) as d_o, \
             rasterio.open(a["out"] + "_sar.tif", "w", count=vrt.count, **prof) as d_s:
            tile = a["tile"]
            for row in range(0, opt.height - tile + 1, tile):
                w = Window(0, row, opt.width, tile)
                d_o.write(opt.read(window=w).astype(np.float32), window=w)
                d_s.write(vrt.read(window=w), window=w)
wall = time.perf_counter() - t
chips = (opt.height // tile) * (opt.width // tile)
me = resource.getrusage(resource.RUSAGE_SELF)
cpu = me.ru_utime + me.ru_stime - a["cpu0"]
print(json.dumps({"wall": wall, "cpu": cpu, "chips": chips, "rss_kb": hwm()}))
"""


def _run(code: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_prepare_bench(size: int = 4096, tile: int = 256, workers: int = 1, sar_crs: str = "EPSG:32632",
                      workdir: Optional[Path] = None, echo=print) -> dict:
    """Generate the pair, time both contenders, print and return the numbers."""
    import rasterio

    from codemae_cli.data.synth import write_scene_pair
    from codemae_cli.errors import UserError

    if size < tile:
        raise UserError(f"--size must be at least one tile ({tile} px)")
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="codemae-bench-prepare-")) if own else Path(workdir)
    known = {"scene", "prepared", "baseline_opt.tif", "baseline_sar.tif"}  # what the bench writes there
    if not own and root.is_dir() and {p.name for p in root.iterdir()} - known:
        raise UserError(f"--workdir '{root}' holds files the bench did not write; choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    try:
        echo(f"generating a {size} x {size} pair (optical 4 x uint16, SAR 2 x float32 linear power in {sar_crs}) ...")
        t, c = time.perf_counter(), time.process_time()
        pair = write_scene_pair(root / "scene", size, size, seed=0, optical_bands=4, optical_dtype="uint16",
                                sar_bands=2, sar_scale="linear", sar_crs=sar_crs, labels=False,
                                overwrite=True)  # replaces only the scenes an earlier bench generated
        gen, gen_cpu = time.perf_counter() - t, time.process_time() - c
        with rasterio.open(pair["sar"]) as s:
            sar_px = s.width * s.height * s.count
        in_mb = (size * size * 4 * 2 + sar_px * 4) / 1e6
        echo(f"  generated in {gen:.1f} s wall, {gen_cpu:.1f} s CPU ({in_mb:,.0f} MB of raster data)")
        args = dict(optical=str(pair["optical"]), sar=str(pair["sar"]), tile=tile, workers=workers)
        base = _run(_BASELINE, dict(args, out=str(root / "baseline")))
        prep = _run(_PREPARE, dict(args, out=str(root / "prepared")))
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepare bench: {size} x {size}, tile {tile}, workers {workers}")
    for col in ("", "wall s", "CPU s", "chips", "chips/s", "MB/s", "peak RSS MB"):
        table.add_column(col, justify="right" if col else "left")
    rows = {}
    for name, r in (("rasterio baseline (read+warp+write)", base), ("codemae prepare", prep)):
        rows[name] = {
            "wall_s": r["wall"], "cpu_s": r["cpu"], "chips": r["chips"], "chips_per_s": r["chips"] / r["wall"],
            "mb_per_s": in_mb / r["wall"], "peak_rss_mb": r["rss_kb"] / 1024,
        }
        v = rows[name]
        table.add_row(name, f"{v['wall_s']:.2f}", f"{v['cpu_s']:.2f}", f"{v['chips']:,}", f"{v['chips_per_s']:.1f}",
                      f"{v['mb_per_s']:.1f}", f"{v['peak_rss_mb']:.0f}")
    Console().print(table)
    ratio = prep["wall"] / base["wall"]
    cpu_ratio = prep["cpu"] / max(base["cpu"], 1e-9)
    echo(f"prepare / baseline: wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x (goal <= 1.5x); "
         f"peak RSS prepare {prep['rss_kb'] / 1024:.0f} MB, baseline {base['rss_kb'] / 1024:.0f} MB")
    return {"size": size, "tile": tile, "workers": workers, "generate_s": gen, "generate_cpu_s": gen_cpu, "input_mb": in_mb,
            "results": rows, "ratio": ratio, "cpu_ratio": cpu_ratio}
