"""``codemae prepare``: optical/SAR scene pairs -> co-registered, memory-mappable chip shards.

    from codemae_cli.data.prepare import PrepareOptions, run_prepare
    summary = run_prepare(PrepareOptions(out="data/", optical=["a.tif"], sar=["b.tif"], tile=256))

Pipeline per scene (docs/architecture.md section 1 describes the output):

1. open and validate every input (CRS, readable, band counts), detect the SAR input scale;
2. reference grid (coregister.reference_grid) and the overlap of all inputs on it;
3. chip lattice over the overlap (``tile``, ``stride``; the last chip snapped to the edge),
   chips grouped into blocks for the spatial split (split.assign_blocks);
4. one band of ``tile`` rows (in segments of 2048 columns) at a time: every input read or warped onto the grid (SAR in
   linear power, then dB once; labels nearest or rasterised), chips cut, the joint validity
   filter applied, kept chips streamed into shards, train chips into the running stats.

Memory follows one segment of a band of rows (tile x 2048 px x bands), never the scene. With
``workers > 1`` bands of rows run in worker processes, each writing its own shard parts,
which are renumbered at the end. Everything is written into ``OUT.tmp-<pid>`` and renamed to
``OUT`` when complete; on any error the temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from codemae_cli import __version__
from codemae_cli.data import raster as R
from codemae_cli.data.coregister import footprint, overlap_window, reference_grid
from codemae_cli.data.geo import (
    Grid,
    power_to_db,
    read_on_grid,
    read_sar_power,
    resampling_kernel,
)
from codemae_cli.data.labels import (
    IGNORE,
    VectorLabels,
    is_vector,
    parse_classes,
    raster_classes,
    raster_label_prepare,
)
from codemae_cli.data.manifest import SceneSpec, read_manifest
from codemae_cli.data.shards import FORMAT, ShardLayout, ShardWriter, finish_dataset
from codemae_cli.data.source_scale import optical_range_rule, source_range_meta
from codemae_cli.data.split import assign_blocks, block_key, parse_split
from codemae_cli.data.stats import RunningStats
from codemae_cli.errors import UserError
from codemae_cli.fsutil import (
    check_writable,
    guard_outputs,
    notice,
    read_json_object,
    staged_file,
    sweep_stale,
)

SEGMENT_PX = 2048  # columns read at once: bounds memory by tile x SEGMENT_PX, not the scene


def _release_memory() -> None:
    """Return freed heap to the OS (glibc only; elsewhere a no-op).

    GDAL's warper allocates its buffers from per-thread malloc arenas, which glibc keeps
    after they are freed: without a trim the resident size creeps up by tens of MB per band
    of rows until the arenas saturate, which looks like memory growing with the scene.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - raises AttributeError off glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


@dataclass
class PrepareOptions:
    """Everything ``codemae prepare`` accepts (see ``codemae prepare --help``)."""

    out: str
    optical: list[str] = field(default_factory=list)
    sar: list[str] = field(default_factory=list)
    manifest: Optional[str] = None
    labels: Optional[str] = None
    label_column: Optional[str] = None
    classes: Optional[str] = None
    tile: int = 256
    stride: Optional[int] = None
    overlap: Optional[int] = None
    ref: str = "optical"
    crs: Optional[str] = None
    res: Optional[float] = None
    sar_scale: str = "auto"
    nodata_optical: Optional[str] = None
    nodata_sar: Optional[str] = None
    optical_bands: Optional[str] = None  # e.g. "2,3,4": 1-based bands of the stacked optical input
    sar_bands: Optional[str] = None
    label_nodata: Optional[str] = None  # label raster value that marks unlabelled pixels (-> 255)
    optical_range: Optional[float] = None  # optical source range [0, R] (default by dtype; data/source_scale.py)
    min_valid: float = 0.5
    split: str = "0.8,0.1,0.1"
    block: int = 4
    seed: int = 0
    workers: int = 1
    overwrite: bool = False
    shard_size: int = 1024
    quicklook: bool = True
    progress: bool = False
    resume: bool = False


@dataclass
class ScenePlan:
    """One scene, resolved and validated (picklable: sent to worker processes)."""

    scene_id: str
    optical: list
    sar: list
    optical_nodata: list
    sar_nodata: list
    sar_scales: list
    optical_resampling: list
    sar_resampling: list
    grid: Grid
    window: tuple  # (row, col, height, width) of the overlap on the grid
    rows: list  # chip row offsets on the grid
    cols: list
    overlap_area: float  # m^2
    labels: Optional[dict] = None  # {"kind": "vector", "vector": VectorLabels} | {"kind": "raster", ...}
    optical_select: Optional[list] = None  # 0-based bands of the stacked inputs kept (None: all)
    sar_select: Optional[list] = None

    @property
    def n_optical(self) -> int:
        return len(self.optical_select) if self.optical_select is not None else sum(s.count for s in self.optical)

    @property
    def n_sar(self) -> int:
        return len(self.sar_select) if self.sar_select is not None else sum(s.count for s in self.sar)


# ----------------------------------------------------------------------------- planning
def _check_options(o: PrepareOptions) -> tuple[int, tuple[float, float, float]]:
    if o.tile < 8:
        raise UserError("--tile must be at least 8 pixels")
    if o.stride is not None and o.overlap is not None:
        raise UserError("give either --stride or --overlap, not both")
    stride = o.stride if o.stride is not None else o.tile - (o.overlap or 0)
    if not 0 < stride:
        raise UserError("--overlap must be smaller than --tile" if o.overlap is not None else "--stride must be positive")
    if o.ref not in ("optical", "sar"):
        raise UserError(f"--ref must be optical or sar, not '{o.ref}'")
    if o.sar_scale not in R.SAR_SCALES:
        raise UserError(f"--sar-scale must be one of {', '.join(R.SAR_SCALES)}, not '{o.sar_scale}'")
    if not 0.0 <= o.min_valid <= 1.0:
        raise UserError("--min-valid must be a fraction between 0 and 1")
    optical_range_rule(None, o.optical_range)  # refuses a non-positive --optical-range before any work
    if o.block < 1:
        raise UserError("--block must be at least 1 chip")
    if o.workers < 1:
        raise UserError("--workers must be at least 1")
    if o.shard_size < 1:
        raise UserError("--shard-size must be at least 1 chip")
    if o.manifest and (o.optical or o.sar):
        raise UserError("give either --manifest or --optical/--sar, not both")
    if o.manifest and o.labels:
        raise UserError("with --manifest, give labels per scene in its 'labels' column")
    if (o.label_column or o.classes or o.label_nodata is not None) and not (o.labels or o.manifest):
        raise UserError("--label-column, --classes and --label-nodata describe labels: give them with --labels")
    return stride, parse_split(o.split)


def _scene_specs(o: PrepareOptions) -> list[SceneSpec]:
    if o.manifest:
        return read_manifest(o.manifest)
    if not o.optical or not o.sar:
        raise UserError("give --optical and --sar (one or more files each), or --manifest")
    return [SceneSpec(optical=list(o.optical), sar=list(o.sar), labels=o.labels)]


def parse_band_list(text: Optional[str], option: str) -> Optional[list[int]]:
    """``--optical-bands 2,3,4`` -> [2, 3, 4] (1-based, in the order the model will see them)."""
    if text is None or str(text).strip() == "":
        return None
    try:
        bands = [int(b) for b in str(text).replace(" ", "").split(",") if b]
    except ValueError:
        raise UserError(f"{option} must list band numbers such as 2,3,4, not '{text}'") from None
    if not bands or min(bands) < 1 or len(set(bands)) != len(bands):
        raise UserError(f"{option} must list distinct band numbers counted from 1, not '{text}'")
    return bands


def _band_select(option: str, text: Optional[str], sources: list, what: str) -> Optional[list[int]]:
    bands = parse_band_list(text, option)
    if bands is None:
        return None
    total = sum(s.count for s in sources)
    if max(bands) > total:
        raise UserError(f"{option} {text} asks for band {max(bands)} but the {what} input has {total} band(s)")
    return [b - 1 for b in bands]


def _band_reads(sources: list, select: Optional[list[int]]) -> tuple[list, Optional[list[int]]]:
    """Per input file, the 1-based bands to read (None: all; []: none), and the permutation that
    puts the bands read (file after file) into the order of ``select`` (None: already in order)."""
    if select is None:
        return [None] * len(sources), None
    reads, read_order, start = [], [], 0
    for s in sources:
        mine = [g for g in select if start <= g < start + s.count]
        reads.append([g - start + 1 for g in mine])
        read_order += mine
        start += s.count
    order = [read_order.index(g) for g in select]
    return reads, None if order == sorted(order) else order


def _positions(start: int, length: int, tile: int, stride: int) -> list[int]:
    """Chip offsets covering [start, start+length): regular steps, last one snapped to the edge."""
    if length < tile:
        return []
    pos = list(range(start, start + length - tile + 1, stride))
    if pos[-1] + tile < start + length:
        pos.append(start + length - tile)
    return pos


def _crs_name(crs) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else (crs.to_string()[:40] or "custom CRS")


def _sar_scale(src, requested: str, nodata: tuple) -> str:
    """The scale of a SAR file (detected with ``auto``); a declared scale must fit its values.
    ``nodata``: the ``--nodata-sar`` override (parsed): its pixels are not values."""
    scale = R.detect_sar_scale(src, requested, nodata)
    if requested != "auto":
        R.check_sar_scale(src, scale, nodata=nodata)
    return scale


def _plan_scene(spec: SceneSpec, o: PrepareOptions, stride: int, sid: str, classes) -> ScenePlan:
    opt_paths = R.expand_inputs(spec.optical, "optical")
    sar_paths = R.expand_inputs(spec.sar, "SAR")
    optical = [R.open_source(p, "optical") for p in opt_paths]
    sar = [R.open_source(p, "SAR") for p in sar_paths]
    for s in optical:
        if s.is_complex:
            raise UserError(f"optical raster '{s.path}' holds complex values; is it SAR?")
    nd_opt, nd_sar = R.parse_nodata(o.nodata_optical), R.parse_nodata(o.nodata_sar)
    optical_select = _band_select("--optical-bands", o.optical_bands, optical, "optical")
    sar_select = _band_select("--sar-bands", o.sar_bands, sar, "SAR")
    grid = reference_grid(optical if o.ref == "optical" else sar, o.crs, o.res)
    polys = [footprint(s.grid, grid.crs) for s in optical + sar]
    window, area = overlap_window(grid, polys)
    if area > 0:  # in m^2 whatever the CRS (a degree^2 means nothing to a reader)
        import shapely
        from shapely.geometry import box

        from codemae_cli.data.areas import area_m2

        area = area_m2(shapely.intersection_all([box(*grid.bounds), *polys]), grid.crs_wkt)
    if window[2] == 0 or window[3] == 0:
        if area > 0:  # they touch, but not over one whole pixel of the reference grid
            raise UserError(f"scene '{sid}': the optical and SAR rasters overlap by less than one whole pixel of "
                            "the reference grid, too little to cut a chip")
        raise UserError(f"scene '{sid}': the optical and SAR rasters do not overlap")
    rows = _positions(window[0], window[2], o.tile, stride)
    cols = _positions(window[1], window[3], o.tile, stride)
    if not rows or not cols:
        raise UserError(
            f"scene '{sid}': the optical/SAR overlap ({window[2]} x {window[3]} px on the reference grid) "
            f"is smaller than one {o.tile} px chip; use a smaller --tile"
        )
    labels = None
    if spec.labels:
        lp = Path(spec.labels)
        if not lp.exists():
            raise UserError(f"label file '{lp}' does not exist")
        if is_vector(lp):
            labels = {"kind": "vector", "source": str(lp),
                      "vector": VectorLabels(lp, o.label_column, classes, grid.crs_wkt)}
        else:
            src = R.open_source(lp, "label")
            if src.count != 1:
                raise UserError(f"label raster '{lp}' must have one band of class codes, not {src.count}")
            if src.is_complex:
                raise UserError(f"label raster '{lp}' must hold class codes")
            labels = {"kind": "raster", "source": str(lp), "raster": src,
                      "nodata": R.effective_nodata(src, R.parse_nodata(o.label_nodata)),
                      "resampling": resampling_kernel(src.grid, grid, "label"),
                      "classes": raster_classes(src.tags, classes)}
            _check_label_sample(labels)
        _check_labels_overlap(labels, grid, window, sid)
    return ScenePlan(
        scene_id=sid,
        optical=optical,
        sar=sar,
        optical_nodata=[R.effective_nodata(s, nd_opt) for s in optical],
        sar_nodata=[R.effective_nodata(s, nd_sar) for s in sar],
        sar_scales=[_sar_scale(s, o.sar_scale, nd_sar) for s in sar],
        optical_resampling=[resampling_kernel(s.grid, grid, "optical") for s in optical],
        sar_resampling=[resampling_kernel(s.grid, grid, "sar") for s in sar],
        grid=grid,
        window=window,
        rows=rows,
        cols=cols,
        overlap_area=area,
        labels=labels,
        optical_select=optical_select,
        sar_select=sar_select,
    )


def _check_label_sample(labels: dict, size: int = 1024) -> None:
    """Read the label raster at most ``size`` px a side (nearest) and check its values before any
    worker starts: a nodata value the file does not declare (Sen1Floods11's -1) is named at
    once, not after minutes of chips. Every block is still checked as it is read."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(labels["raster"].path) as ds:
        step = max(1, math.ceil(max(ds.height, ds.width) / size))
        sample = ds.read(1, out_shape=(max(1, ds.height // step), max(1, ds.width // step)),
                         resampling=Resampling.nearest)
    raster_label_prepare(labels["nodata"], labels["source"])(sample[None])


def _check_labels_overlap(labels: dict, grid: Grid, window: tuple, sid: str) -> None:
    """Labels lying wholly outside the optical/SAR overlap would make every chip background: refuse."""
    from shapely.geometry import box

    area = box(*grid.window_bounds(*window))
    if labels["kind"] == "vector":
        extent = box(*labels["vector"].gdf.total_bounds)
    else:
        extent = footprint(labels["raster"].grid, grid.crs)
    if not extent.intersects(area):
        raise UserError(f"scene '{sid}': the label file '{labels['source']}' does not overlap the optical/SAR "
                        "overlap (wrong file or wrong CRS?)")


def _unique_ids(specs: list[SceneSpec]) -> list[str]:
    ids, seen = [], Counter()
    for spec in specs:
        base = spec.scene_id or Path(str(spec.optical[0]).rstrip("/")).stem or "scene"
        seen[base] += 1
        ids.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return ids


def _harmonise_vector_classes(plans: list[ScenePlan], o: PrepareOptions, classes) -> None:
    """Without --classes, label files of several scenes must share one code table."""
    vec = [p.labels["vector"] for p in plans if p.labels and p.labels["kind"] == "vector"]
    if classes is not None or len(vec) < 2:
        return
    tables = [v.classes for v in vec]
    if all(t == tables[0] for t in tables):
        return
    names = sorted({n for t in tables for n in t.values()} - {"background"})
    merged = ["background"] + names
    for p in plans:
        if p.labels and p.labels["kind"] == "vector":
            p.labels["vector"] = VectorLabels(p.labels["source"], o.label_column, merged, p.grid.crs_wkt)


# ----------------------------------------------------------------------------- chip rows
#: GDAL block cache (MB) of a prepare worker while it reads a scene, unless GDAL_CACHEMAX is set.
GDAL_CACHE_MB = 64


@dataclass
class _SceneSources:
    """The open datasets of one scene's rasters, opened once per worker task (not in the
    picklable plan): ``None`` for a file none of whose bands is read."""

    optical: list
    sar: list
    label: Optional[object]
    # Per file, the 1-based bands read (--optical-bands / --sar-bands; None: all, []: none), and
    # the permutation into the chosen order (None: already in order): see :func:`_band_reads`.
    optical_reads: list
    optical_order: Optional[list[int]]
    sar_reads: list
    sar_order: Optional[list[int]]


def _open_sources(plan: ScenePlan, stack: contextlib.ExitStack) -> _SceneSources:
    """Open every raster ``_read_row_band`` reads, each once; ``stack`` closes them."""
    import rasterio

    if "GDAL_CACHEMAX" not in os.environ:
        # Open datasets keep their blocks in GDAL's cache (5 % of RAM by default) until closed:
        # cap it so a worker's memory does not grow with the scene.
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
    reads, order = _band_reads(plan.optical, plan.optical_select)
    sar_reads, sar_order = _band_reads(plan.sar, plan.sar_select)

    def opened(sources, file_reads):
        return [None if idx == [] else stack.enter_context(rasterio.open(src.path))
                for src, idx in zip(sources, file_reads, strict=True)]

    label = None
    if plan.labels is not None and plan.labels["kind"] != "vector":
        label = stack.enter_context(rasterio.open(plan.labels["raster"].path))
    return _SceneSources(opened(plan.optical, reads), opened(plan.sar, sar_reads), label, reads, order, sar_reads,
                         sar_order)


def _read_row_band(plan: ScenePlan, sources: _SceneSources, row: int, col0: int, width: int, tile: int):
    """Optical (float32, NaN), SAR (dB, NaN) and labels (uint8) for one band of rows."""
    grid = plan.grid
    parts = []
    # Only the chosen bands are read (--optical-bands, --sar-bands); an unused band never drops a pixel.
    for ds, nd, rs, idx in zip(sources.optical, plan.optical_nodata, plan.optical_resampling, sources.optical_reads,
                               strict=True):
        if idx == []:
            continue
        parts.append(read_on_grid(ds, grid, row, col0, tile, width, kernel=rs, indexes=idx,
                                  prepare=lambda b, nd=nd: R.optical_to_float(b, nd)))
    optical = np.concatenate(parts, axis=0)
    if sources.optical_order is not None:
        optical = optical[sources.optical_order]
    optical = R.invalidate_pixels(optical)
    parts = []
    for ds, nd, sc, rs, idx in zip(sources.sar, plan.sar_nodata, plan.sar_scales, plan.sar_resampling,
                                   sources.sar_reads, strict=True):
        if idx == []:
            continue
        parts.append(read_sar_power(ds, grid, row, col0, tile, width, kernel=rs, scale=sc, nodata=nd, indexes=idx))
    # Resampled in linear power above; converted to dB exactly once here.
    sar = np.concatenate(parts, axis=0)
    if sources.sar_order is not None:
        sar = sar[sources.sar_order]
    sar = power_to_db(R.invalidate_pixels(sar))
    label = None
    if plan.labels is not None:
        if plan.labels["kind"] == "vector":
            label = plan.labels["vector"].rasterize(grid, row, col0, tile, width)
        else:
            lab = plan.labels
            label = read_on_grid(sources.label, grid, row, col0, tile, width, kernel=lab["resampling"],
                                 prepare=raster_label_prepare(lab["nodata"], lab["source"]),
                                 out_dtype=np.uint8, fill=IGNORE)[0]
    return optical, sar, label


def _process_rows(plan: ScenePlan, row_indices: list[int], splits: dict, tile: int, min_valid: float,
                  block: int, writer: ShardWriter, on_row: Optional[Callable[[int], None]] = None) -> dict:
    """Cut, filter and write the chips of some chip rows of one scene (the writer keeps the stats)."""
    rows_out, dropped, label_values = [], Counter(), set()
    area = float(tile * tile)
    # Chips of a row are read in segments of about SEGMENT_PX columns, so memory is bounded
    # by tile x SEGMENT_PX x bands whatever the scene's width.
    per_segment = max(1, SEGMENT_PX // tile)
    segments = [list(range(k, min(k + per_segment, len(plan.cols)))) for k in range(0, len(plan.cols), per_segment)]
    with contextlib.ExitStack() as stack:
        sources = _open_sources(plan, stack)
        for ri in row_indices:
            row = plan.rows[ri]
            for seg in segments:
                col0 = plan.cols[seg[0]]
                width = plan.cols[seg[-1]] + tile - col0
                optical, sar, label = _read_row_band(plan, sources, row, col0, width, tile)
                valid_o = ~np.isnan(optical[0])
                valid_s = ~np.isnan(sar[0])
                for ci in seg:
                    col = plan.cols[ci]
                    sl = np.s_[col - col0: col - col0 + tile]
                    vo, vs = valid_o[:, sl], valid_s[:, sl]
                    f_opt = float(vo.sum()) / area
                    f_sar = float(vs.sum()) / area
                    f_joint = float((vo & vs).sum()) / area
                    if f_joint < min_valid or f_joint == 0.0:
                        reason = "no_optical" if f_opt == 0 else "no_sar" if f_sar == 0 else "low_valid"
                        dropped[reason] += 1
                        continue
                    chip_o = optical[:, :, sl]
                    chip_s = sar[:, :, sl]
                    chip_l = label[:, sl] if label is not None else None
                    split = splits[(plan.scene_id, *block_key(ri, ci, block))]
                    part, offset = writer.write(chip_o, chip_s, chip_l, train=split == "train")
                    if chip_l is not None:
                        label_values.update(np.flatnonzero(np.bincount(chip_l.ravel(), minlength=256)).tolist())
                    rows_out.append({
                        "scene_id": plan.scene_id, "row": int(row), "col": int(col),
                        "valid_optical": f_opt, "valid_sar": f_sar, "valid_joint": f_joint,
                        "split": split, "part": part, "offset": offset,
                    })
                if on_row is not None:
                    on_row(len(seg))
            _release_memory()
    return {"rows": rows_out, "dropped": dropped, "label_values": label_values}


def _worker_task(args: tuple, on_row: Optional[Callable[[int], None]] = None) -> dict:
    """One task: some (scene, chip rows) units, in order, into the task's own shard parts.

    With ``done`` set, the finished result is also saved as JSON (written to a temp name,
    then renamed) so ``--resume`` can skip the task next time.
    """
    units, splits, layout, min_valid, block, shards_dir, prefix, shard_size, done = args
    tile = layout.tile
    writer = ShardWriter(shards_dir, layout, shard_size=shard_size, prefix=prefix)
    merged: Optional[dict] = None
    try:
        for plan, row_indices in units:
            res = _process_rows(plan, row_indices, splits, tile, min_valid, block, writer, on_row=on_row)
            if merged is None:
                merged = res
            else:
                merged["rows"] += res["rows"]
                merged["dropped"].update(res["dropped"])
                merged["label_values"] |= res["label_values"]
    except BaseException:
        writer.abort()
        raise
    assert merged is not None
    merged["parts"] = writer.close()
    merged["stats"] = writer.stats
    if done:
        _save_task(merged, Path(done))
    return merged


def _save_task(res: dict, path: Path) -> None:
    data = {
        "rows": res["rows"],
        "dropped": dict(res["dropped"]),
        "label_values": sorted(res["label_values"]),
        "stats": {m: {"count": st.count.tolist(), "mean": st.mean.tolist(), "m2": st.m2.tolist()}
                  for m, st in res["stats"].items()},
        "parts": [{"files": {m: Path(f).name for m, f in part["files"].items()}, "count": part["count"]}
                  for part in res["parts"]],
    }
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data))


def _load_task(path: Path, shards_dir: Path) -> Optional[dict]:
    """A finished task's result, or None if its record or any of its shard files is missing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    parts = [{"files": {m: str(shards_dir / f) for m, f in part["files"].items()}, "count": part["count"]}
             for part in data["parts"]]
    if not all(Path(f).is_file() for part in parts for f in part["files"].values()):
        return None
    stats = {}
    for m, st in data["stats"].items():
        rs = RunningStats(len(st["count"]))
        rs.count, rs.mean, rs.m2 = (np.asarray(st[k], dtype=np.float64) for k in ("count", "mean", "m2"))
        stats[m] = rs
    return {"rows": data["rows"], "dropped": Counter(data["dropped"]), "label_values": set(data["label_values"]),
            "stats": stats, "parts": parts}


def _make_tasks(plans: list[ScenePlan], target_chips: int) -> list[list[tuple]]:
    """Split all chip rows of all scenes into tasks of about ``target_chips`` candidate chips.

    Small scenes are packed together (a manifest of thousands of small patches must not
    become thousands of shard files); large scenes are split into groups of rows. Each task
    writes its own shard parts, so a task of about one shard keeps the shards nearly full.
    """
    tasks, current, size = [], [], 0
    for plan in plans:
        per_row = len(plan.cols)
        start = 0
        while start < len(plan.rows):
            take = min(len(plan.rows) - start, max(1, math.ceil((target_chips - size) / per_row)))
            current.append((plan, list(range(start, start + take))))
            size += take * per_row
            start += take
            if size >= target_chips:
                tasks.append(current)
                current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


# ----------------------------------------------------------------------------- output
def _guard_output(out: Path, plans: list[ScenePlan], o: PrepareOptions) -> None:
    """The dataset folder may not be, contain or lie inside a file prepare reads."""
    inputs = [(o.manifest, "the manifest")]
    for p in plans:
        inputs += [(s.path, f"the optical scene of '{p.scene_id}'") for s in p.optical]
        inputs += [(s.path, f"the SAR scene of '{p.scene_id}'") for s in p.sar]
        if p.labels:
            inputs.append((p.labels["source"], f"the labels of '{p.scene_id}'"))
    guard_outputs([(out, "the output folder")], inputs, folder=True)


def is_prepared_dataset(path: Path) -> bool:
    """A folder written by prepare: its metadata.json names the codemae-chips format."""
    return read_json_object(Path(path) / "metadata.json").get("format") == FORMAT


def _prepare_out_dir(out: Path, overwrite: bool, resume: bool, fingerprint: str) -> Path:
    if out.exists():
        if not overwrite:
            raise UserError(f"output '{out}' already exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise UserError(f"output '{out}' exists and is not a directory")
        if not is_prepared_dataset(out) and any(out.iterdir()):
            raise UserError(f"refusing to overwrite '{out}': it is not empty and not a prepared dataset")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)  # OUT.tmp-PID folders of killed runs (a --resume run's OUT.partial is reused)
    if not resume and (out.parent / f"{out.name}.partial").is_dir():
        notice(f"note: '{out.name}.partial' holds an interrupted --resume run; rerun with --resume to finish it, "
               "or delete it")
    if resume:
        # A fixed name, kept when a --resume run fails or is interrupted.
        tmp = out.parent / f"{out.name}.partial"
        record = tmp / "options.json"
        if tmp.exists():
            if not record.is_file() or record.read_text() != fingerprint:
                raise UserError(
                    f"'{tmp}' was started with other inputs or options; rerun with the same ones or delete it"
                )
            (tmp / "shards").mkdir(exist_ok=True)
            (tmp / "done").mkdir(exist_ok=True)
            return tmp
        (tmp / "shards").mkdir(parents=True)
        (tmp / "done").mkdir()
        record.write_text(fingerprint)
        return tmp
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "shards").mkdir(parents=True)
    return tmp


def _fingerprint(o: PrepareOptions, plans: list[ScenePlan]) -> str:
    """Everything that decides the chips: options (not workers/progress) and the inputs' identity."""
    opts = {k: v for k, v in vars(o).items() if k not in ("progress", "workers", "overwrite", "quicklook", "resume")}
    files = []
    for p in plans:
        for src in p.optical + p.sar:
            st = os.stat(src.path)
            files.append([src.path, st.st_size, st.st_mtime_ns])
        if p.labels:
            st = os.stat(p.labels["source"])
            files.append([p.labels["source"], st.st_size, st.st_mtime_ns])
    return json.dumps({"options": opts, "files": files, "version": __version__}, sort_keys=True, default=str)


def _nan_to_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _selected(names: list, select: Optional[list]) -> list:
    return names if select is None else [names[i] for i in select]


def _one_based(select: Optional[list]) -> Optional[list]:
    return None if select is None else [i + 1 for i in select]


def _source_note(src, rs: str, grid: Grid) -> str:
    name = Path(src.path).name
    if rs == "none":
        return f"{name}: on the reference grid (read, not resampled)"
    return (f"{name}: {_crs_name(src.crs)} {src.pixel_size:.3g} -> {_crs_name(grid.crs)} "
            f"{math.sqrt(grid.res[0] * grid.res[1]):.3g}, {rs}")


def run_prepare(options: PrepareOptions | None = None, **kwargs) -> dict:
    """Prepare chips; returns a summary dict (counts, dropped reasons, warping, paths)."""
    o = options if options is not None else PrepareOptions(**kwargs)
    t0 = time.perf_counter()
    stride, fractions = _check_options(o)
    classes = parse_classes(o.classes)
    out = check_writable(o.out, "the output folder", folder=True)
    if out.exists() and not o.overwrite:
        raise UserError(f"output '{out}' already exists; pass --overwrite to replace it")

    specs = _scene_specs(o)
    ids = _unique_ids(specs)
    plans = [_plan_scene(spec, o, stride, sid, classes) for spec, sid in zip(specs, ids, strict=True)]
    _harmonise_vector_classes(plans, o, classes)
    first = plans[0]
    n_opt, n_sar = first.n_optical, first.n_sar
    for p in plans[1:]:
        if p.n_optical != n_opt or p.n_sar != n_sar:
            raise UserError(f"scene '{p.scene_id}' has a different number of optical or SAR bands than '{first.scene_id}'")
        if p.grid.crs != first.grid.crs:
            raise UserError(
                f"scenes '{first.scene_id}' and '{p.scene_id}' are in different CRSs "
                f"({_crs_name(first.grid.crs)}, {_crs_name(p.grid.crs)}); pass --crs to choose one"
            )
    has_labels = any(p.labels for p in plans)
    if has_labels and not all(p.labels for p in plans):
        raise UserError("give labels for every scene of the manifest or for none")
    keys = [(p.scene_id, *block_key(ri, ci, o.block)) for p in plans
            for ri in range(len(p.rows)) for ci in range(len(p.cols))]
    splits = assign_blocks(keys, fractions, o.seed)

    _guard_output(out, plans, o)
    tmp = _prepare_out_dir(out, o.overwrite, o.resume, _fingerprint(o, plans))
    try:
        layout = _layout(plans, o.tile, has_labels)
        results = _run_tasks(plans, splits, o, tmp, layout)
        summary = _finish(plans, results, o, stride, tmp, layout, classes)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    except BaseException:
        if not o.resume:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if o.resume:
        shutil.rmtree(tmp / "done", ignore_errors=True)
        (tmp / "options.json").unlink(missing_ok=True)
    if out.exists():  # --overwrite: replace only once the new dataset is complete
        shutil.rmtree(out)
    tmp.rename(out)
    summary["seconds"] = time.perf_counter() - t0
    summary["out"] = str(out)
    summary["paths"] = {k: str(out / Path(v).relative_to(tmp)) if v else None for k, v in summary["paths"].items()}
    return summary


def _run_tasks(plans, splits, o: PrepareOptions, tmp: Path, layout: ShardLayout) -> list[dict]:
    shards_dir = tmp / "shards"
    total = sum(len(p.rows) * len(p.cols) for p in plans)
    target = o.shard_size
    if o.workers > 1:  # at least about four tasks per worker: balance and a moving progress bar
        target = max(1, min(target, math.ceil(total / (4 * o.workers))))
    tasks = _make_tasks(plans, target)
    progress = None
    if o.progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("chips"),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    results: list[Optional[dict]] = [None] * len(tasks)
    todo = []
    for k, units in enumerate(tasks):
        prefix = f"t{k:06d}"
        done = tmp / "done" / f"{prefix}.json" if o.resume else None
        if done is not None and done.is_file():
            results[k] = _load_task(done, shards_dir)
        if results[k] is None:
            for stale in shards_dir.glob(f"{prefix}_*.npy"):  # an interrupted attempt
                stale.unlink()
            todo.append((k, (units, splits, layout, o.min_valid, o.block, str(shards_dir), prefix, o.shard_size,
                             str(done) if done else None)))

    def chips_of(units):
        return sum(len(idx) * len(plan.cols) for plan, idx in units)

    with progress if progress is not None else _Null():
        task_id = progress.add_task("prepare", total=total) if progress is not None else None

        def advance(n):
            if progress is not None:
                progress.advance(task_id, n)

        advance(sum(chips_of(tasks[k]) for k in range(len(tasks)) if results[k] is not None))
        if o.workers <= 1:
            for k, args in todo:
                results[k] = _worker_task(args, on_row=advance)
        elif todo:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: GDAL and thread pools do not survive a fork reliably.
            with ProcessPoolExecutor(max_workers=o.workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [(k, pool.submit(_worker_task, args)) for k, args in todo]
                try:
                    for k, fut in futures:
                        results[k] = fut.result()
                        advance(chips_of(tasks[k]))
                except BaseException:
                    # Do not start queued tasks; running ones finish before the temp dir goes.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    for k, res in enumerate(results):
        res["writer"] = k  # type: ignore[index]
    return results  # type: ignore[return-value]


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _layout(plans: list[ScenePlan], tile: int, has_labels: bool) -> ShardLayout:
    """Shard dtypes: integer optical in its source dtype when every optical input shares it."""
    dtypes = {s.dtype for p in plans for s in p.optical}
    return ShardLayout.for_source(dtypes.pop() if len(dtypes) == 1 else "float32", tile=tile,
                                  optical_bands=plans[0].n_optical, sar_bands=plans[0].n_sar, labels=has_labels)


@dataclass
class _Merged:
    """The workers' results joined: shard parts in order, index rows and their footprints."""

    parts: list
    chips: list
    geometries: list
    stats: dict
    dropped: Counter
    label_values: set


def _merge_results(plans: list[ScenePlan], results: list[dict], tile: int) -> _Merged:
    """Every task's shard parts in task order; index rows pointing into that list."""
    from shapely.geometry import box

    plan_by_id = {p.scene_id: p for p in plans}
    m = _Merged(parts=[], chips=[], geometries=[], stats={}, dropped=Counter(), label_values=set())
    for res in results:
        base = len(m.parts)
        m.parts += res["parts"]
        m.dropped.update(res["dropped"])
        m.label_values |= res["label_values"]
        for mod, st in res["stats"].items():
            m.stats[mod] = st if mod not in m.stats else m.stats[mod].merge(st)
        for r in res["rows"]:
            plan = plan_by_id[r["scene_id"]]
            m.geometries.append(box(*plan.grid.window_bounds(r["row"], r["col"], tile, tile)))
            m.chips.append({
                "chip_id": f"{r['scene_id']}_r{r['row']:06d}_c{r['col']:06d}",
                "scene_id": r["scene_id"],
                "optical_src": ";".join(s.path for s in plan.optical),
                "sar_src": ";".join(s.path for s in plan.sar),
                "row": r["row"], "col": r["col"],
                "valid_optical": r["valid_optical"], "valid_sar": r["valid_sar"], "valid_joint": r["valid_joint"],
                "split": r["split"], "shard": base + r["part"], "offset": r["offset"],
            })
    return m


def _label_meta(plans: list[ScenePlan], classes, label_values: set) -> Optional[dict]:
    """metadata.json "labels": the class table (from the vector file, the raster's tags,
    --classes, or the codes seen) and where the labels came from."""
    first = plans[0].labels
    if first is None:
        return None
    if first["kind"] == "vector":
        table = first["vector"].classes
    else:
        names = first.get("classes") or classes
        if names:
            table = {str(k): n for k, n in enumerate(names)}
        else:
            table = {str(v): f"class_{v}" for v in sorted(label_values - {IGNORE})}
    return {
        "source": ";".join(p.labels["source"] for p in plans),
        "kind": first["kind"],
        "column": first["vector"].column if first["kind"] == "vector" else None,
        "classes": table,
        "ignore_index": IGNORE,
        "nodata": _nan_to_none(first["nodata"]) if first["kind"] == "raster" else None,  # -> ignore_index
    }


def _scene_meta(p: ScenePlan, chips: int) -> dict:
    return {
        "scene_id": p.scene_id,
        "optical": [s.path for s in p.optical],
        "sar": [s.path for s in p.sar],
        "labels": p.labels["source"] if p.labels else None,
        "grid_transform": list(p.grid.transform)[:6],
        "grid_size": [p.grid.height, p.grid.width],
        "window": list(p.window),
        "overlap_area_m2": p.overlap_area,
        "sar_input_scale": p.sar_scales,
        "resampling": {"optical": p.optical_resampling, "sar": p.sar_resampling},
        "chips": chips,
    }


def _warp_notes(p: ScenePlan) -> list[str]:
    """One line per input: read on the grid, or warped from which CRS/resolution with what."""
    notes = [_source_note(s, rs, p.grid) for s, rs in zip(p.optical, p.optical_resampling, strict=True)]
    notes += [_source_note(s, rs, p.grid) + (f" (input {sc}, resampled in linear power)" if rs != "none" else f" (input {sc})")
              for s, rs, sc in zip(p.sar, p.sar_resampling, p.sar_scales, strict=True)]
    if p.labels is not None:
        how = ("rasterised onto the grid" if p.labels["kind"] == "vector" else
               "label raster on the reference grid (read, not resampled)" if p.labels["resampling"] == "none"
               else f"label raster, {p.labels['resampling']}")
        notes.append(f"{Path(p.labels['source']).name}: {how}")
    return notes


def _dataset_meta(plans: list[ScenePlan], o: PrepareOptions, stride: int, merged: _Merged, label_meta) -> dict:
    """prepare's own metadata.json keys (the format keys and stats come from finish_dataset)."""
    g = plans[0].grid
    scales = sorted({s for p in plans for s in p.sar_scales})
    per_scene = Counter(c["scene_id"] for c in merged.chips)
    nd = plans[0].optical_nodata[0]
    return {
        "stride": stride,
        "crs": g.crs_wkt,
        "crs_name": _crs_name(g.crs),
        "res": [g.res[0], g.res[1]],
        "ref": o.ref,
        "paired": True,
        "optical": {
            "bands": _selected(R.band_names(plans[0].optical, "B"), plans[0].optical_select),
            "selected": _one_based(plans[0].optical_select),  # bands of the input kept (1-based; null: all)
            "input_count": sum(s.count for s in plans[0].optical),
            "source_dtype": plans[0].optical[0].dtype,
            "nodata": _nan_to_none(nd) if nd is not None else None,
            "nodata_override": R.nodata_override_meta(o.nodata_optical),  # --nodata-optical (null: each file's own)
            # --optical-range overrides the dtype rule finish_dataset records otherwise.
            **(source_range_meta(optical_range_rule(None, o.optical_range)) if o.optical_range else {}),
        },
        "sar": {
            "bands": _selected(R.band_names(plans[0].sar, "P"), plans[0].sar_select),
            "selected": _one_based(plans[0].sar_select),
            "input_count": sum(s.count for s in plans[0].sar),
            "scale": "db",
            "input_scale": scales[0] if len(scales) == 1 else "mixed",
            "nodata_override": R.nodata_override_meta(o.nodata_sar),  # --nodata-sar (null: each file's own)
        },
        "labels": label_meta,
        "split_fractions": list(parse_split(o.split)),
        "split_block": o.block,
        "seed": o.seed,
        "min_valid": o.min_valid,
        "scenes": [_scene_meta(p, per_scene[p.scene_id]) for p in plans],
        "dropped": dict(sorted(merged.dropped.items())),
    }


def _finish(plans, results, o: PrepareOptions, stride: int, tmp: Path, layout: ShardLayout, classes) -> dict:
    """Join the tasks' results into the dataset (shards numbered, index, metadata, quick-look)
    and return the summary."""
    merged = _merge_results(plans, results, o.tile)
    if not merged.chips:
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(merged.dropped.items())) or "none"
        raise UserError(
            f"no chip has at least {o.min_valid:.0%} pixels valid in both optical and SAR (dropped: {reasons}); "
            "check the nodata values or lower --min-valid"
        )
    label_meta = _label_meta(plans, classes, merged.label_values)
    meta = finish_dataset(tmp, layout, merged.parts, merged.chips, merged.geometries, plans[0].grid.crs_wkt,
                          merged.stats, _dataset_meta(plans, o, stride, merged, label_meta))
    ql = None
    if o.quicklook:
        from codemae_cli.data.quicklook import write_quicklook

        ql = write_quicklook(tmp, tmp / "quicklook.png")
    g = plans[0].grid
    return {
        "chips": len(merged.chips),
        "splits": meta["splits"],
        "dropped": meta["dropped"],
        "candidates": len(merged.chips) + sum(merged.dropped.values()),
        "scenes": len(plans),
        "overlap_area": sum(p.overlap_area for p in plans),
        "crs": _crs_name(g.crs),
        "res": [g.res[0], g.res[1]],
        "warped": [{"scene_id": p.scene_id, "notes": _warp_notes(p)} for p in plans],
        "bands": "; ".join(
            f"{name} {', '.join(meta[m]['bands'])}" + (f" (of {meta[m]['input_count']})" if meta[m]["selected"] else "")
            for m, name in (("optical", "optical"), ("sar", "SAR"))),
        "shards": meta["n_shards"],
        "stats": meta["stats"],
        "labels": label_meta,
        "paths": {
            "metadata": str(tmp / "metadata.json"),
            "index": str(tmp / "index.gpkg"),
            "shards": str(tmp / "shards"),
            "quicklook": str(ql) if ql else None,
        },
    }
