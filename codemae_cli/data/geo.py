"""Geospatial basics shared by ``prepare``, ``predict`` and ``evaluate``.

One implementation of each, so that training data and prediction inputs are made the same way:

=====================  ===================================================================
``Grid``               a pixel grid: CRS, affine transform, width, height (frozen, picklable);
                       window transforms and bounds come from ``rasterio.windows``
``same_grid_offset``   the one "same grid" test: same CRS and pixel size, pixel edges aligned,
                       all within ``SAME_GRID_TOL`` (0.05) pixel over the grid's extent
``resampling_kernel``  the one resampling policy (below)
``read_on_grid``       any raster's bands on a window of a grid: read directly when on the same
                       grid, else warped with GDAL in fixed column blocks (below)
``sar_to_power``       the one SAR scale conversion to linear power; ``power_to_db`` back
``read_sar_db``        SAR on a grid window in dB: to linear power, resampled, to dB once
``rasterize_shapes``   the one vector-label rasteriser (pixel centres inside the polygon)
=====================  ===================================================================

Resampling policy (continuous data: optical and SAR; SAR is resampled in linear power):

* the source lies on the grid (``same_grid_offset``): read, not resampled ("none");
* labels: ``nearest`` (class codes must not be blended);
* the source pixel is more than 1.5x finer than the grid pixel: ``average``, so speckle and
  texture are integrated rather than aliased;
* otherwise (coarser, or about the same size on another grid): ``bilinear``.

Every warp runs with one kernel scale fixed for the whole (source, grid) pair, invalid (NaN)
source pixels never blended into valid ones, and in destination blocks of ``WARP_BLOCK`` columns aligned to the
grid's column 0. GDAL approximates the coordinate transformation along each destination row
of a block and sizes the kernel from the block unless told: with all three fixed, a grid pixel
gets bit-identical values whatever window asked for it (a prepare chip, a predict strip).

SAR scale rules: linear power is used as is; amplitude is squared; dB is ``10^(x/10)``;
complex (SLC) samples give intensity ``|z|^2``. In every scale the nodata value and
non-finite values are nodata, and so is any amplitude or power <= 0 (it has no dB value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

SAME_GRID_TOL = 0.05  # pixels, over the grid's extent
AVERAGE_RATIO = 1.5  # source pixels this much finer than the grid are averaged
WARP_BLOCK = 512  # destination columns warped per GDAL call, aligned to the grid's column 0
SAR_SCALES = ("linear", "amplitude", "db")
_ROTATION_EPS = 1e-12


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS, affine transform, width and height.

    Accepts a CRS object or any CRS text (WKT, ``EPSG:n``) and an ``Affine`` or its six
    coefficients; stores a ``rasterio.crs.CRS`` and an ``affine.Affine`` (both picklable).
    """

    crs: Any
    transform: Any
    width: int
    height: int

    def __post_init__(self):
        from affine import Affine
        from rasterio.crs import CRS

        crs = self.crs if isinstance(self.crs, CRS) else CRS.from_user_input(self.crs)
        object.__setattr__(self, "crs", crs)
        object.__setattr__(self, "transform", Affine(*tuple(self.transform)[:6]))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    @classmethod
    def of(cls, ds) -> Grid:
        """The grid of an open rasterio dataset."""
        return cls(ds.crs, ds.transform, ds.width, ds.height)

    @property
    def crs_wkt(self) -> str:
        return self.crs.to_wkt()

    @property
    def rotated(self) -> bool:
        t = self.transform
        return abs(t.b) > _ROTATION_EPS or abs(t.d) > _ROTATION_EPS

    @property
    def res(self) -> tuple[float, float]:
        t = self.transform
        return math.hypot(t.a, t.d), math.hypot(t.b, t.e)

    @property
    def pixel_size(self) -> float:
        """Geometric mean pixel size in CRS units (rotated grids too)."""
        t = self.transform
        return math.sqrt(abs(t.a * t.e - t.b * t.d))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return self.window_bounds(0, 0, self.height, self.width)

    def window_transform(self, row: int, col: int = 0):
        """The transform of the window whose top-left pixel is ``(row, col)``."""
        from rasterio.windows import Window, transform

        return transform(Window(col, row, 1, 1), self.transform)

    def window_bounds(self, row: int, col: int, height: int, width: int) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a pixel window."""
        from rasterio.windows import Window, bounds

        if not self.rotated:
            return bounds(Window(col, row, width, height), self.transform)
        t = self.transform  # rotated: the box around the four corners
        xs, ys = zip(*(t * (c, r) for c in (col, col + width) for r in (row, row + height)), strict=True)
        return min(xs), min(ys), max(xs), max(ys)

    def outline(self, n: int = 21) -> tuple[np.ndarray, np.ndarray]:
        """The grid's outline, ``n`` points a side, clockwise, as CRS coordinates (x, y)."""
        up, down = np.linspace(0, 1, n), np.linspace(1, 0, n)
        cols = np.concatenate([up, np.ones(n), down, np.zeros(n)]) * self.width
        rows = np.concatenate([np.zeros(n), up, np.ones(n), down]) * self.height
        t = self.transform
        return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


# ----------------------------------------------------------------------------- policy
def same_grid_offset(src: Grid, grid: Grid) -> Optional[tuple[int, int]]:
    """Integer (row, col) of ``grid``'s origin in ``src`` when both are the same pixel grid.

    Same CRS, the same pixel size and orientation, pixel edges aligned, all within
    ``SAME_GRID_TOL`` pixel over the grid's extent; else None (the source must be resampled).
    """
    if src.crs != grid.crs:
        return None
    a, g = src.transform, grid.transform
    extent = max(grid.width, grid.height)
    tol = SAME_GRID_TOL * grid.pixel_size / extent
    if max(abs(a.a - g.a), abs(a.b - g.b), abs(a.d - g.d), abs(a.e - g.e)) > tol:
        return None
    col, row = ~a * (g.c, g.f)
    if abs(col - round(col)) > SAME_GRID_TOL or abs(row - round(row)) > SAME_GRID_TOL:
        return None
    return int(round(row)), int(round(col))


@lru_cache(maxsize=64)
def warp_scale(src: Grid, grid: Grid) -> float:
    """Grid pixels per source pixel (GDAL's XSCALE/YSCALE), one value for the whole pair.

    The source's outline is mapped into grid pixels; the scale is the square root of the
    ratio of the source's pixel count to that area (< 1: the source is finer than the grid).
    """
    from rasterio.warp import transform as warp_transform

    xs, ys = src.outline()
    if src.crs != grid.crs:
        xs, ys = (np.asarray(v) for v in warp_transform(src.crs, grid.crs, xs, ys))
    inv = ~grid.transform
    cols, rows = inv.a * xs + inv.b * ys + inv.c, inv.d * xs + inv.e * ys + inv.f
    ok = np.isfinite(cols) & np.isfinite(rows)
    c, r = cols[ok], rows[ok]
    area = 0.5 * abs(np.dot(c, np.roll(r, 1)) - np.dot(r, np.roll(c, 1)))  # shoelace, in grid pixels
    if not np.isfinite(area) or area <= 0:
        return 1.0
    return float(math.sqrt(area / (src.width * src.height)))


def resampling_kernel(src: Grid, grid: Grid, kind: str) -> str:
    """The resampling policy: 'none' (same grid), 'nearest' (``kind`` 'label'), 'average'
    (source pixel more than 1.5x finer than the grid's) or 'bilinear'."""
    if same_grid_offset(src, grid) is not None:
        return "none"
    if kind == "label":
        return "nearest"
    return "average" if warp_scale(src, grid) * AVERAGE_RATIO < 1.0 else "bilinear"


# ----------------------------------------------------------------------------- reading
def read_on_grid(
    ds,
    grid: Grid,
    row: int,
    col: int,
    height: int,
    width: int,
    *,
    kernel: str,
    prepare: Callable[[np.ndarray], np.ndarray],
    out_dtype=np.float32,
    fill=np.nan,
    indexes: Optional[list[int]] = None,
) -> np.ndarray:
    """Bands of the open dataset ``ds`` on the grid window ``(row, col, height, width)``.

    ``indexes``: the 1-based bands to read, in that order (default all): unused bands of a
    13-band product are never read.

    ``kernel`` comes from :func:`resampling_kernel`. ``prepare`` turns a raw source block
    (bands, h, w) into what is resampled (float32 with NaN nodata, e.g. SAR in linear power;
    or uint8 labels with 255 nodata). Pixels masked by the file's internal mask or alpha band
    become ``fill``. Only the source pixels under the window are read.
    """
    src = Grid.of(ds)
    out = np.full((len(indexes) if indexes else ds.count, height, width), fill, dtype=out_dtype)
    if kernel == "none":
        offset = same_grid_offset(src, grid)
        if offset is None:
            raise ValueError(f"'{ds.name}' does not lie on the grid; it must be resampled")
        _read_direct(ds, offset[0] + row, offset[1] + col, prepare, out, fill, indexes)
        return out
    scale = warp_scale(src, grid)
    # Whole blocks of the grid's column lattice, cropped: see the module docstring.
    first = (col // WARP_BLOCK) * WARP_BLOCK
    for b0 in range(first, col + width, WARP_BLOCK):
        bw = min(WARP_BLOCK, grid.width - b0)
        block = np.full((out.shape[0], height, bw), fill, dtype=out_dtype)
        _warp_block(ds, src, grid, row, b0, block, kernel, scale, prepare, fill, indexes)
        lo, hi = max(b0, col), min(b0 + bw, col + width)
        out[:, :, lo - col:hi - col] = block[:, :, lo - b0:hi - b0]
    return out


def _read_direct(ds, r0: int, c0: int, prepare, out: np.ndarray, fill, indexes=None) -> None:
    """The source window at (r0, c0) of ``out``'s size, clipped to the source; the rest stays ``fill``."""
    from rasterio.windows import Window

    height, width = out.shape[1:]
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r0 + height, ds.height), min(c0 + width, ds.width)
    if rr1 <= rr0 or cc1 <= cc0:
        return
    win = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
    out[:, rr0 - r0: rr1 - r0, cc0 - c0: cc1 - c0] = _prepared(ds, win, prepare, fill, indexes)


def _prepared(ds, win, prepare, fill, indexes=None) -> np.ndarray:
    """``prepare`` of the raw window, with pixels of the file's internal mask / alpha set to ``fill``."""
    from rasterio.enums import MaskFlags

    block = prepare(ds.read(indexes, window=win))
    if any(MaskFlags.per_dataset in f or MaskFlags.alpha in f for f in ds.mask_flag_enums):
        block[ds.read_masks(indexes, window=win) == 0] = fill
    return block


def _warp_block(ds, src: Grid, grid: Grid, row: int, col: int, dest: np.ndarray, kernel: str, scale: float,
                prepare, fill, indexes=None) -> None:
    from rasterio.enums import Resampling
    from rasterio.warp import reproject
    from rasterio.windows import Window

    height, width = dest.shape[1:]
    win = _source_window(src, grid, row, col, height, width, scale)
    if win is None:
        return  # the block lies outside the source: all fill
    r0, c0, h, w = win
    window = Window(c0, r0, w, h)
    block = _prepared(ds, window, prepare, fill, indexes)
    # GDAL's kernels run about 2x faster without nodata masks, which only matter where NaN
    # could be blended into valid pixels. Any NaN under a pixel's kernel lies in every source
    # window read for that pixel, so masking only blocks holding NaN gives the same values
    # (up to float rounding of the weights) whatever window asked for the pixel.
    masked = kernel != "nearest" and np.issubdtype(block.dtype, np.floating) and bool(np.isnan(block).any())
    nodata = {"src_nodata": fill, "dst_nodata": fill} if masked else {}
    # Room for the whole block in one go: GDAL would otherwise split it, and the split moves
    # the rows' transformation approximation.
    mem_mb = int((block.nbytes + dest.nbytes) * 4 / 2**20) + 64
    reproject(
        source=block,
        destination=dest,
        src_transform=src.transform * src.transform.translation(c0, r0),
        src_crs=src.crs,
        dst_transform=grid.window_transform(row, col),
        dst_crs=grid.crs,
        resampling=getattr(Resampling, kernel),
        num_threads=1,
        init_dest_nodata=False,
        warp_mem_limit=mem_mb,
        XSCALE=scale,
        YSCALE=scale,
        **nodata,
    )


def _source_window(src: Grid, grid: Grid, row: int, col: int, height: int, width: int,
                   scale: float) -> Optional[tuple[int, int, int, int]]:
    """Source pixel window (row, col, h, w) under a grid window, with the kernel's reach as margin."""
    from rasterio.warp import transform as warp_transform

    xs, ys = Grid(grid.crs, grid.window_transform(row, col), width, height).outline(9)
    if src.crs != grid.crs:
        xs, ys = (np.asarray(v) for v in warp_transform(grid.crs, src.crs, xs, ys))
    inv = ~src.transform
    sc, sr = inv.a * xs + inv.b * ys + inv.c, inv.d * xs + inv.e * ys + inv.f
    ok = np.isfinite(sc) & np.isfinite(sr)
    if not ok.any():
        return None
    # A kernel downsampling by 1/scale reaches 1/scale source pixels; 2 more for rounding.
    margin = int(math.ceil(2 + max(1.0, 1.0 / max(scale, 1e-6))))
    c0 = max(0, int(math.floor(sc[ok].min())) - margin)
    r0 = max(0, int(math.floor(sr[ok].min())) - margin)
    c1 = min(src.width, int(math.ceil(sc[ok].max())) + margin)
    r1 = min(src.height, int(math.ceil(sr[ok].max())) + margin)
    if c1 <= c0 or r1 <= r0:
        return None
    return r0, c0, r1 - r0, c1 - c0


# ----------------------------------------------------------------------------- SAR
def sar_to_power(values: np.ndarray, scale: str, nodata: Optional[float] = None) -> np.ndarray:
    """SAR values in ``scale`` (complex samples in any) -> float32 linear power, NaN where invalid.

    Invalid: the nodata value, non-finite values, and amplitude or power <= 0.
    """
    from codemae_cli.errors import UserError

    if np.iscomplexobj(values):
        power = (values.real.astype(np.float32) ** 2 + values.imag.astype(np.float32) ** 2)
    elif scale in SAR_SCALES:
        power = values.astype(np.float32, copy=True)
        if nodata is not None and not math.isnan(nodata):
            power[values == nodata] = np.nan
        if scale == "db":
            with np.errstate(over="ignore", under="ignore"):
                np.power(np.float32(10.0), power / np.float32(10.0), out=power)
        elif scale == "amplitude":
            power[~(power > 0)] = np.nan  # a negative amplitude is invalid, not a positive power
            np.multiply(power, power, out=power)
    else:
        raise UserError(f"unknown SAR scale '{scale}' (use linear, amplitude or db)")
    # One pass: NaN, <= 0 and inf (also overflowed squares and powers) fail and become NaN.
    ok = (power > 0) & (power < np.inf)
    return np.where(ok, power, np.float32(np.nan)).astype(np.float32, copy=False)


def power_to_db(power: np.ndarray) -> np.ndarray:
    """Linear power -> dB; non-positive or NaN -> NaN."""
    out = np.full(power.shape, np.nan, dtype=np.float32)
    np.log10(power, out=out, where=power > 0)
    out *= np.float32(10.0)
    return out


def read_sar_power(ds, grid: Grid, row: int, col: int, height: int, width: int, *, kernel: str, scale: str,
                   nodata: Optional[float], indexes: Optional[list[int]] = None) -> np.ndarray:
    """SAR bands of ``ds`` (``indexes``: 1-based, default all) on a grid window in linear power
    (NaN nodata), resampled in power."""
    return read_on_grid(ds, grid, row, col, height, width, kernel=kernel, indexes=indexes,
                        prepare=lambda block: sar_to_power(block, scale, nodata))


def read_sar_db(ds, grid: Grid, row: int, col: int, height: int, width: int, *, kernel: str, scale: str,
                nodata: Optional[float], indexes: Optional[list[int]] = None) -> np.ndarray:
    """SAR bands of ``ds`` on a grid window in dB: linear power, resampled, converted once."""
    return power_to_db(read_sar_power(ds, grid, row, col, height, width, kernel=kernel, scale=scale, nodata=nodata,
                                      indexes=indexes))


# ----------------------------------------------------------------------------- labels
def rasterize_shapes(shapes: Iterable[tuple[Any, int]], grid: Grid, row: int = 0, col: int = 0,
                     height: Optional[int] = None, width: Optional[int] = None, *, fill: int = 0,
                     dtype="uint8") -> np.ndarray:
    """Burn ``(geometry, value)`` pairs (in the grid's CRS) onto a grid window.

    A pixel takes the value of the last geometry containing its centre; others are ``fill``.
    """
    from rasterio.features import rasterize

    height = grid.height if height is None else height
    width = grid.width if width is None else width
    out = np.full((height, width), fill, dtype=dtype)
    shapes = list(shapes)
    if not shapes:
        return out
    return rasterize(shapes, out_shape=(height, width), transform=grid.window_transform(row, col), fill=fill,
                     out=out, dtype=dtype)


__all__ = [
    "AVERAGE_RATIO",
    "SAME_GRID_TOL",
    "SAR_SCALES",
    "WARP_BLOCK",
    "Grid",
    "power_to_db",
    "rasterize_shapes",
    "read_on_grid",
    "read_sar_db",
    "read_sar_power",
    "resampling_kernel",
    "same_grid_offset",
    "sar_to_power",
    "warp_scale",
]
