"""Reference grid, overlap, and windowed warping of every input onto the reference grid.

The reference grid is explicit: by default the finest-resolution raster of the reference
modality (optical unless ``--ref sar``), optionally re-projected to ``--crs`` and/or resampled
to ``--res``. Every other raster is warped onto it band of rows by band of rows with
``rasterio.warp.reproject`` and an explicit resampling: bilinear for continuous data (average
when the source is more than 1.5x finer than the grid, so speckle and texture are integrated
rather than aliased), nearest for labels. A raster that already lies on the grid (within 0.05
pixel over its extent) is read directly without resampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from codemae_cli.data.raster import GeoreferencedMixin, RasterSource
from codemae_cli.errors import UserError

SAME_GRID_TOL = 0.05  # pixels
WARP_CHUNK = 1024  # columns warped per reproject call


@dataclass
class Grid(GeoreferencedMixin):
    """A north-up pixel grid: CRS (WKT), affine transform coefficients, size."""

    crs_wkt: str
    transform: tuple
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        a = self.affine
        return abs(a.a), abs(a.e)

    def window_transform(self, row: int, col: int):
        return self.affine @ self.affine.translation(col, row)

    def window_bounds(self, row: int, col: int, height: int, width: int) -> tuple[float, float, float, float]:
        a = self.affine
        x0, y0 = a @ (col, row)
        x1, y1 = a @ (col + width, row + height)
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def reference_grid(
    sources: list[RasterSource], crs: Optional[str] = None, res: Optional[float] = None
) -> Grid:
    """Grid of the finest source of the reference modality, optionally in ``crs`` at ``res``."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.transform import from_origin
    from rasterio.warp import calculate_default_transform

    base = min(sources, key=lambda s: s.pixel_size)  # first of the finest (stable)
    a = base.affine
    rotated = abs(a.b) > 1e-12 or abs(a.d) > 1e-12
    if crs is None and res is None and not rotated:
        return Grid(base.crs_wkt, tuple(a)[:6], base.width, base.height)
    if crs is not None:
        try:
            dst_crs = CRS.from_user_input(crs)
        except CRSError:
            raise UserError(f"--crs '{crs}' is not a CRS rasterio understands (try EPSG:32631)") from None
    else:
        dst_crs = base.crs
    if res is not None and not res > 0:
        raise UserError("--res must be a positive pixel size in units of the reference CRS")
    left, bottom, right, top = _bounds(base)
    if dst_crs == base.crs:
        # Same CRS (new pixel size, or a rotated source made north-up): keep the extent.
        r = float(res) if res is not None else base.pixel_size
        width = max(1, int(math.floor((right - left) / r + 1e-9)))
        height = max(1, int(math.floor((top - bottom) / r + 1e-9)))
        return Grid(dst_crs.to_wkt(), tuple(from_origin(left, top, r, r))[:6], width, height)
    kwargs = {"resolution": float(res)} if res is not None else {}
    transform, width, height = calculate_default_transform(
        base.crs, dst_crs, base.width, base.height, left=left, bottom=bottom, right=right, top=top, **kwargs
    )
    return Grid(dst_crs.to_wkt(), tuple(transform)[:6], int(width), int(height))


def _bounds(src: RasterSource) -> tuple[float, float, float, float]:
    a = src.affine
    xs, ys = zip(*[a @ (c, r) for c, r in ((0, 0), (src.width, 0), (0, src.height), (src.width, src.height))], strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def footprint(src: RasterSource, dst_crs_wkt: str):
    """The raster's outline polygon in ``dst_crs`` (densified edges, so curved edges survive)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp_transform
    from shapely.geometry import Polygon

    a = src.affine
    n = 21
    t = np.linspace(0, 1, n)
    cols = np.concatenate([t * src.width, np.full(n, src.width), (1 - t) * src.width, np.zeros(n)])
    rows = np.concatenate([np.zeros(n), t * src.height, np.full(n, src.height), (1 - t) * src.height])
    xs = a.a * cols + a.b * rows + a.c
    ys = a.d * cols + a.e * rows + a.f
    dst = CRS.from_wkt(dst_crs_wkt)
    if src.crs != dst:
        xs, ys = warp_transform(src.crs, dst, xs.tolist(), ys.tolist())
    poly = Polygon(zip(xs, ys, strict=True))
    return poly if poly.is_valid else poly.buffer(0)


def overlap_window(grid: Grid, polygons) -> tuple[tuple[int, int, int, int], float]:
    """Pixel window ``(row, col, height, width)`` of ``grid`` inside every polygon's bounding box
    (whole pixels, rounded inward), and the area of the polygons' intersection (CRS units^2)."""
    from shapely.geometry import box

    inter = box(*grid.window_bounds(0, 0, grid.height, grid.width))
    for p in polygons:
        inter = inter.intersection(p)
    if inter.is_empty or inter.area <= 0:
        return (0, 0, 0, 0), 0.0
    left, bottom, right, top = inter.bounds
    inv = ~grid.affine
    c0, r0 = inv @ (left, top)
    c1, r1 = inv @ (right, bottom)
    c0, c1 = sorted((c0, c1))
    r0, r1 = sorted((r0, r1))
    c0 = max(0, int(math.ceil(c0 - 1e-6)))
    r0 = max(0, int(math.ceil(r0 - 1e-6)))
    c1 = min(grid.width, int(math.floor(c1 + 1e-6)))
    r1 = min(grid.height, int(math.floor(r1 + 1e-6)))
    if c1 <= c0 or r1 <= r0:
        return (0, 0, 0, 0), float(inter.area)
    return (r0, c0, r1 - r0, c1 - c0), float(inter.area)


def same_grid_offset(src: RasterSource, grid: Grid) -> Optional[tuple[int, int]]:
    """Integer (row, col) offset of ``grid`` in ``src`` when both are the same pixel grid.

    Same CRS and pixel size, pixel edges aligned, all within ``SAME_GRID_TOL`` pixel over the
    grid's extent; else None (the source must be resampled).
    """
    if src.crs != grid.crs:
        return None
    a, g = src.affine, grid.affine
    if abs(a.b) > 1e-12 or abs(a.d) > 1e-12:
        return None
    extent = max(grid.width, grid.height)
    if abs(a.a - g.a) * extent > SAME_GRID_TOL * abs(g.a) or abs(a.e - g.e) * extent > SAME_GRID_TOL * abs(g.e):
        return None
    col = (g.c - a.c) / a.a
    row = (g.f - a.f) / a.e
    if abs(col - round(col)) > SAME_GRID_TOL or abs(row - round(row)) > SAME_GRID_TOL:
        return None
    return int(round(row)), int(round(col))


def choose_resampling(src: RasterSource, grid: Grid, kind: str) -> str:
    """'none' (same grid), 'nearest' (labels), 'average' (source much finer) or 'bilinear'."""
    if same_grid_offset(src, grid) is not None:
        return "none"
    if kind == "label":
        return "nearest"
    # Compare pixel sizes in the grid's CRS units via the footprint area per pixel.
    fp = footprint(src, grid.crs_wkt)
    src_px = math.sqrt(fp.area / (src.width * src.height)) if fp.area > 0 else src.pixel_size
    grid_px = math.sqrt(grid.res[0] * grid.res[1])
    return "average" if src_px * 1.5 < grid_px else "bilinear"


def read_on_grid(
    src: RasterSource,
    grid: Grid,
    row: int,
    col: int,
    height: int,
    width: int,
    *,
    resampling: str,
    prepare: Callable[[np.ndarray], np.ndarray],
    out_dtype=np.float32,
    fill=np.nan,
) -> np.ndarray:
    """Bands of ``src`` on the grid window ``(row, col, height, width)``.

    ``prepare`` turns the raw source block (bands, h, w) into what is resampled (float32
    with NaN nodata, e.g. SAR in linear power; or uint8 labels with 255 nodata). Only the
    source rows/cols under the window are read, so memory follows the window.
    """
    import rasterio
    from rasterio.windows import Window

    out = np.full((src.count, height, width), fill, dtype=out_dtype)
    with rasterio.open(src.path) as ds:
        offset = same_grid_offset(src, grid) if resampling == "none" else None
        if offset is not None:
            r0, c0 = offset[0] + row, offset[1] + col
            # Clip to the source; the rest stays at fill.
            rr0, cc0 = max(r0, 0), max(c0, 0)
            rr1, cc1 = min(r0 + height, src.height), min(c0 + width, src.width)
            if rr1 > rr0 and cc1 > cc0:
                block = ds.read(window=Window(cc0, rr0, cc1 - cc0, rr1 - rr0))
                out[:, rr0 - r0: rr1 - r0, cc0 - c0: cc1 - c0] = prepare(block)
            return out
        # Warp in column chunks: across a rotation between CRSs the source rows under a long,
        # thin band of rows grow with its width, so chunks keep the source read near the
        # destination's size.
        for c0 in range(0, width, WARP_CHUNK):
            cw = min(WARP_CHUNK, width - c0)
            _warp_into(ds, src, grid, row, col + c0, height, cw, resampling, prepare, out[:, :, c0:c0 + cw], fill)
    return out


def _warp_into(ds, src, grid, row, col, height, width, resampling, prepare, dest, fill) -> None:
    from rasterio.enums import Resampling
    from rasterio.warp import reproject
    from rasterio.windows import Window

    win = _source_window(src, grid, row, col, height, width, resampling)
    if win is None:
        return
    r0, c0, h, w = win
    block = prepare(ds.read(window=Window(c0, r0, w, h)))
    src_tf = src.affine @ src.affine.translation(c0, r0)
    # GDAL's warp kernel is about 2x faster without nodata masks. They are only needed when
    # invalid source pixels could be mixed into valid ones (NaN under a bilinear/average
    # kernel); `dest` is pre-filled, and GDAL leaves pixels it cannot compute untouched.
    masked = resampling != "nearest" and np.issubdtype(block.dtype, np.floating) and bool(np.isnan(block).any())
    nodata = {"src_nodata": fill, "dst_nodata": fill, "init_dest_nodata": True} if masked else {
        "init_dest_nodata": False}
    tmp = np.ascontiguousarray(dest)
    reproject(
        source=block,
        destination=tmp,
        src_transform=src_tf,
        src_crs=src.crs,
        dst_transform=grid.window_transform(row, col),
        dst_crs=grid.crs,
        resampling=getattr(Resampling, resampling),
        num_threads=1,
        **nodata,
    )
    dest[...] = tmp


def _source_window(src: RasterSource, grid: Grid, row, col, height, width, resampling) -> Optional[tuple]:
    """Source pixel window (row, col, h, w) covering a grid window, with a resampling margin."""
    from rasterio.warp import transform as warp_transform

    n = 9
    t = np.linspace(0, 1, n)
    cols = np.concatenate([col + t * width, np.full(n, col + width), col + (1 - t) * width, np.full(n, col)])
    rows = np.concatenate([np.full(n, row), row + t * height, np.full(n, row + height), row + (1 - t) * height])
    g = grid.affine
    xs = g.a * cols + g.b * rows + g.c
    ys = g.d * cols + g.e * rows + g.f
    if src.crs != grid.crs:
        xs, ys = warp_transform(grid.crs, src.crs, xs.tolist(), ys.tolist())
        xs, ys = np.asarray(xs), np.asarray(ys)
    inv = ~src.affine
    sc = inv.a * xs + inv.b * ys + inv.c
    sr = inv.d * xs + inv.e * ys + inv.f
    # Margin: the resampling kernel's reach (bilinear 1 px; average spans the grid pixel).
    ratio = max(1.0, math.sqrt(grid.res[0] * grid.res[1]) / max(src.pixel_size, 1e-12))
    margin = int(math.ceil(2 + (ratio if resampling == "average" else 1)))
    c0 = max(0, int(math.floor(sc.min())) - margin)
    r0 = max(0, int(math.floor(sr.min())) - margin)
    c1 = min(src.width, int(math.ceil(sc.max())) + margin)
    r1 = min(src.height, int(math.ceil(sr.max())) + margin)
    if c1 <= c0 or r1 <= r0:
        return None
    return r0, c0, r1 - r0, c1 - c0
