"""Scene readers for whole-scene prediction: strips of rows on one reference grid.

``read_strip(row, nrows, col0, col1)`` returns the float32 pixels ``(C, nrows, col1 - col0)`` of a
band of rows of the reference grid (columns ``[col0, col1)``, the full width by default) plus a
validity mask ``(nrows, col1 - col0)`` (False where any band is nodata or NaN). The
reference grid is the optical scene's (or the SAR scene's for SAR-only models). A SAR scene on
another grid is warped onto the reference grid strip by strip (and panel by panel), with one
resampling scale fixed for the whole grid, so nothing ever holds the whole scene: the SAR pixels under a strip are read, converted to linear power, resampled
bilinearly with GDAL, and converted to dB once (values <= 0 become nodata).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from codemae_cli.errors import UserError

SarScale = Literal["db", "linear", "amplitude"]


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform and size."""

    crs: object  # rasterio.crs.CRS
    transform: object  # affine.Affine
    height: int
    width: int

    def strip_transform(self, row: int):
        from affine import Affine

        t = self.transform  # the grid shifted down by ``row`` rows (works for rotated grids too)
        return Affine(t.a, t.b, t.c + t.b * row, t.d, t.e, t.f + t.e * row)

    def window_transform(self, row: int, col: int = 0):
        """The grid shifted down by ``row`` rows and right by ``col`` columns (rotated grids too)."""
        from affine import Affine

        t = self.transform
        return Affine(t.a, t.b, t.c + t.a * col + t.b * row, t.d, t.e, t.f + t.d * col + t.e * row)

    def same_as(self, other: Grid) -> bool:
        return (
            self.crs == other.crs
            and self.height == other.height
            and self.width == other.width
            and self.transform.almost_equals(other.transform, precision=1e-9)
        )


def open_scene(path: str | Path, what: str):
    """Open a raster for reading, answering a missing/unreadable file or a missing CRS in one sentence."""
    from codemae_cli.data.raster import open_raster

    p = Path(path)
    ds = open_raster(p, f"the {what} scene")
    if ds.crs is None:
        ds.close()
        raise UserError(f"the {what} scene '{p}' has no CRS, so its output could not be georeferenced")
    if ds.width < 1 or ds.height < 1:
        ds.close()
        raise UserError(f"the {what} scene '{p}' is empty")
    return ds


def grid_of(ds) -> Grid:
    return Grid(crs=ds.crs, transform=ds.transform, height=ds.height, width=ds.width)


def _valid_from_masks(masks: np.ndarray, data: np.ndarray) -> np.ndarray:
    """All bands valid: GDAL's per-band masks (nodata value, internal mask, alpha) and finite values."""
    valid = np.all(masks > 0, axis=0)
    if np.issubdtype(data.dtype, np.floating) or np.iscomplexobj(data):
        valid &= np.all(np.isfinite(data), axis=0)
    return valid


def _to_db(power: np.ndarray) -> np.ndarray:
    """Linear power -> dB; zero, negative and non-finite power become NaN (nodata)."""
    out = np.full(power.shape, np.nan, dtype=np.float32)
    ok = np.isfinite(power) & (power > 0)
    out[ok] = 10.0 * np.log10(power[ok])
    return out


def to_linear_power(data: np.ndarray, scale: SarScale) -> np.ndarray:
    """SAR pixels in ``scale`` (or complex SLC samples) -> linear power float32, NaN where invalid."""
    if np.iscomplexobj(data):
        # single-look complex: intensity |z|^2 is linear power whatever the declared scale
        return (np.abs(data) ** 2).astype(np.float32)
    x = data.astype(np.float32, copy=False)
    if scale == "db":
        return np.power(np.float32(10.0), x / np.float32(10.0)).astype(np.float32)
    if scale == "amplitude":
        p = x * x
        p[~np.isfinite(x) | (x <= 0)] = np.nan
        return p
    p = x.copy()
    p[~np.isfinite(x) | (x <= 0)] = np.nan
    return p


class OpticalSource:
    """Strips of an optical scene on its own grid, as float32 in the file's units."""

    kind = "optical"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ds = open_scene(self.path, "optical")
        self.grid = grid_of(self.ds)
        self.bands = self.ds.count

    def read_strip(self, row: int, nrows: int, col0: int = 0, col1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window

        col0, col1 = _cols(self.grid, col0, col1)
        win = Window(col0, row, col1 - col0, nrows)
        data = self.ds.read(window=win)
        valid = _valid_from_masks(self.ds.read_masks(window=win), data)
        return data.astype(np.float32, copy=False), valid

    def close(self) -> None:
        self.ds.close()


class SarSource:
    """Strips of a SAR scene in dB on a reference grid (its own, or warped onto the optical one)."""

    kind = "sar"

    def __init__(self, path: str | Path, scale: SarScale = "db", ref: Grid | None = None):
        from rasterio.warp import transform_bounds

        if scale not in ("db", "linear", "amplitude"):
            raise UserError(f"the SAR scale must be db, linear or amplitude, not '{scale}'")
        self.path = Path(path)
        self.scale: SarScale = scale
        self.ds = open_scene(self.path, "SAR")
        self.bands = self.ds.count
        own = grid_of(self.ds)
        self.grid = ref if ref is not None else own
        self.aligned = ref is None or own.same_as(ref)
        if not self.aligned:
            left, bottom, right, top = _grid_bounds(self.grid)
            try:
                sl, sb, sr, st = transform_bounds(self.grid.crs, self.ds.crs, left, bottom, right, top, densify_pts=21)
            except Exception:
                self.close()
                raise UserError(f"the SAR scene '{self.path}' cannot be placed on the optical grid") from None
            ol, ob, or_, ot = _grid_bounds(own)
            if sl >= or_ or sr <= ol or sb >= ot or st <= ob:
                self.close()
                raise UserError(f"the SAR scene '{self.path}' does not overlap the optical scene")
            self.scale_xy = self._warp_scale()

    def read_strip(self, row: int, nrows: int, col0: int = 0, col1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window

        col0, col1 = _cols(self.grid, col0, col1)
        if self.aligned:
            win = Window(col0, row, col1 - col0, nrows)
            data = self.ds.read(window=win)
            valid = _valid_from_masks(self.ds.read_masks(window=win), data)
            if self.scale == "db" and not np.iscomplexobj(data):
                db = data.astype(np.float32, copy=True)
            else:
                db = _to_db(to_linear_power(data, self.scale))
            valid &= np.all(np.isfinite(db), axis=0)
            return db, valid
        db = self._warp_strip(row, nrows, col0, col1)
        valid = np.all(np.isfinite(db), axis=0)
        return db, valid

    def _warp_strip(self, row: int, nrows: int, col0: int, col1: int) -> np.ndarray:
        """Read the SAR pixels under the strip's columns ``[col0, col1)``, resample them in linear
        power (kernel scale fixed for the whole grid), return dB."""
        from rasterio.enums import Resampling
        from rasterio.warp import reproject
        from rasterio.windows import Window

        g = self.grid
        ncols = col1 - col0
        out = np.full((self.bands, nrows, ncols), np.nan, dtype=np.float32)
        dst_transform = g.window_transform(row, col0)
        c0, r0, c1, r1 = self._source_window(Grid(g.crs, dst_transform, nrows, ncols))
        if c1 <= c0 or r1 <= r0:
            return out  # the strip lies outside the SAR footprint: all nodata
        win = Window(c0, r0, c1 - c0, r1 - r0)
        data = self.ds.read(window=win)
        valid = _valid_from_masks(self.ds.read_masks(window=win), data)
        power = to_linear_power(data, self.scale)
        power[:, ~valid] = np.nan
        power[~np.isfinite(power) | (power <= 0)] = np.nan
        reproject(
            source=power,
            destination=out,
            src_transform=self.ds.window_transform(win),
            src_crs=self.ds.crs,
            src_nodata=np.nan,
            dst_transform=dst_transform,
            dst_crs=g.crs,
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
            XSCALE=self.scale_xy,
            YSCALE=self.scale_xy,
        )
        return _to_db(out)

    def _outline_in_source_pixels(self, g: Grid) -> tuple[np.ndarray, np.ndarray]:
        """A grid's outline (21 points a side, clockwise) as SAR pixel coordinates (col, row)."""
        from rasterio.warp import transform as warp_transform

        t = g.transform
        k = 21
        up, down = np.linspace(0, 1, k), np.linspace(1, 0, k)
        cs = np.concatenate([up, np.ones(k), down, np.zeros(k)]) * g.width
        rs = np.concatenate([np.zeros(k), up, np.ones(k), down]) * g.height
        xs, ys = t.a * cs + t.b * rs + t.c, t.d * cs + t.e * rs + t.f
        if g.crs != self.ds.crs:
            xs, ys = (np.asarray(v) for v in warp_transform(g.crs, self.ds.crs, xs, ys))
        inv = ~self.ds.transform
        return inv.a * xs + inv.b * ys + inv.c, inv.d * xs + inv.e * ys + inv.f

    def _warp_scale(self) -> float:
        """Destination pixels per SAR pixel along each axis, for the whole reference grid.

        GDAL otherwise guesses the resampling kernel's scale from each strip's source window,
        which for a rotated SAR grid differs from strip to strip (and from a whole-scene warp):
        fixing it once makes the strip-wise warp identical to warping the scene in one go.
        """
        pc, pr = self._outline_in_source_pixels(self.grid)
        ok = np.isfinite(pc) & np.isfinite(pr)
        area = 0.5 * abs(np.dot(pc[ok], np.roll(pr[ok], 1)) - np.dot(pr[ok], np.roll(pc[ok], 1)))  # shoelace
        if not np.isfinite(area) or area <= 0:
            return 1.0
        return float(np.sqrt(self.grid.height * self.grid.width / area))

    def _source_window(self, strip: Grid) -> tuple[int, int, int, int]:
        """SAR pixel window (c0, r0, c1, r1) under a strip of the reference grid, clipped to the scene.

        The strip's outline is sampled densely, projected into the SAR CRS and mapped through the
        inverse SAR transform, which also holds for rotated (SLC) geotransforms. Two source
        pixels of margin give bilinear sampling its neighbours at the strip edges.
        """
        pc, pr = self._outline_in_source_pixels(strip)
        ok = np.isfinite(pc) & np.isfinite(pr)
        if not ok.any():
            return 0, 0, 0, 0
        c0 = max(int(np.floor(pc[ok].min())) - 2, 0)
        r0 = max(int(np.floor(pr[ok].min())) - 2, 0)
        c1 = min(int(np.ceil(pc[ok].max())) + 2, self.ds.width)
        r1 = min(int(np.ceil(pr[ok].max())) + 2, self.ds.height)
        return c0, r0, c1, r1

    def close(self) -> None:
        self.ds.close()


def _cols(g: Grid, col0: int, col1: int | None) -> tuple[int, int]:
    """Column range ``[col0, col1)`` of a strip, the full width by default, checked against the grid."""
    col1 = g.width if col1 is None else int(col1)
    col0 = int(col0)
    if not 0 <= col0 < col1 <= g.width:
        raise ValueError(f"columns [{col0}, {col1}) lie outside the grid's {g.width} columns")
    return col0, col1


def _grid_bounds(g: Grid) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a grid, valid for rotated transforms too."""
    xs, ys = [], []
    for c, r in ((0, 0), (g.width, 0), (0, g.height), (g.width, g.height)):
        t = g.transform
        x, y = t.a * c + t.b * r + t.c, t.d * c + t.e * r + t.f
        xs.append(x)
        ys.append(y)
    return min(xs), min(ys), max(xs), max(ys)


__all__ = ["Grid", "OpticalSource", "SarScale", "SarSource", "grid_of", "open_scene", "to_linear_power"]
