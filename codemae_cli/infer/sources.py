"""Scene readers for whole-scene prediction: strips of rows on one reference grid.

``read_strip(row, nrows, col0, col1)`` returns the float32 pixels ``(C, nrows, col1 - col0)`` of a
band of rows of the reference grid (columns ``[col0, col1)``, the full width by default) plus a
validity mask ``(nrows, col1 - col0)`` (False where any band is nodata or NaN). The
reference grid is the optical scene's (or the SAR scene's for SAR-only models). Optical pixels
are read and judged valid by the rule ``prepare`` uses (:func:`codemae_cli.data.raster.optical_to_float`).

SAR is read exactly as ``prepare`` reads it for training, by the same functions of
:mod:`codemae_cli.data.geo`: the same "same grid" test, resampling policy (average for SAR
more than 1.5x finer than the grid, bilinear otherwise), warp (kernel scale fixed for the
whole grid, fixed column blocks) and scale conversion (to linear power, resampled, converted
to dB once; values <= 0 become nodata). So the model sees at a pixel the SAR it was trained
on there. Nothing ever holds the whole scene: only the SAR pixels under a strip are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from codemae_cli.data.geo import Grid, read_on_grid, read_sar_db, resampling_kernel
from codemae_cli.data.raster import optical_to_float
from codemae_cli.errors import UserError

SarScale = Literal["db", "linear", "amplitude"]


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


def scene_nodata(ds, override=None) -> float | None:
    """The nodata value a scene is read with: ``override`` as ``--nodata-*`` takes it (what prepare
    was told, recorded in the checkpoint; None: the file's own), as prepare reads its inputs."""
    from codemae_cli.data.raster import effective_nodata, parse_nodata

    return effective_nodata(ds, parse_nodata(override))


def band_select(ds, selected: list[int] | None, what: str, path: Path) -> list[int] | None:
    """0-based bands of a scene the model reads: those chosen at prepare (``--optical-bands``,
    recorded 1-based in the checkpoint), or None for all. A scene that already holds exactly the
    chosen bands is read whole."""
    if not selected or (ds.count == len(selected) and max(selected) > ds.count):
        return None
    if max(selected) > ds.count:
        listed = ",".join(map(str, selected))
        raise UserError(f"the {what} scene '{path}' has {ds.count} band(s) but the model reads bands {listed} of its "
                        f"input (chosen at prepare); give the full scene or one with exactly those bands")
    return [b - 1 for b in selected]


class OpticalSource:
    """Strips of an optical scene on its own grid, as float32 in the file's units (NaN: nodata).

    Read as ``prepare`` reads optical rasters: a pixel is nodata when every band equals the
    file's nodata value, any band is not finite, or the file's internal mask says so.
    """

    kind = "optical"

    def __init__(self, path: str | Path, indexes: list[int] | None = None, nodata=None):
        self.path = Path(path)
        self.ds = open_scene(self.path, "optical")
        self.nodata = scene_nodata(self.ds, nodata)
        self.grid = Grid.of(self.ds)
        self.select = band_select(self.ds, indexes, "optical", self.path)
        self.bands = self.ds.count if self.select is None else len(self.select)

    def read_strip(self, row: int, nrows: int, col0: int = 0, col1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        col0, col1 = _cols(self.grid, col0, col1)
        nodata = self.nodata
        # Only the bands chosen at prepare are read, as prepare reads them: the same pixels are valid.
        indexes = None if self.select is None else [b + 1 for b in self.select]
        data = read_on_grid(self.ds, self.grid, row, col0, nrows, col1 - col0, kernel="none", indexes=indexes,
                            prepare=lambda block: optical_to_float(block, nodata))
        return data, np.all(np.isfinite(data), axis=0)

    def close(self) -> None:
        self.ds.close()


class SarSource:
    """Strips of a SAR scene in dB on a reference grid (its own, or resampled onto the optical one)."""

    kind = "sar"

    def __init__(self, path: str | Path, scale: SarScale = "db", ref: Grid | None = None,
                 indexes: list[int] | None = None, nodata=None):
        if scale not in ("db", "linear", "amplitude"):
            raise UserError(f"the SAR scale must be db, linear or amplitude, not '{scale}'")
        self.path = Path(path)
        self.scale: SarScale = scale
        self.ds = open_scene(self.path, "SAR")
        self.nodata = scene_nodata(self.ds, nodata)
        self.select = band_select(self.ds, indexes, "SAR", self.path)
        self.bands = self.ds.count if self.select is None else len(self.select)
        own = Grid.of(self.ds)
        self.grid = ref if ref is not None else own
        self.kernel = resampling_kernel(own, self.grid, "sar")
        self._check_overlap(own)

    def _check_overlap(self, own: Grid) -> None:
        from rasterio.warp import transform_bounds

        try:
            sl, sb, sr, st = transform_bounds(self.grid.crs, own.crs, *self.grid.bounds, densify_pts=21)
        except Exception:
            self.close()
            raise UserError(f"the SAR scene '{self.path}' cannot be placed on the optical grid") from None
        ol, ob, or_, ot = own.bounds
        if sl >= or_ or sr <= ol or sb >= ot or st <= ob:
            self.close()
            raise UserError(f"the SAR scene '{self.path}' does not overlap the optical scene")

    def read_strip(self, row: int, nrows: int, col0: int = 0, col1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        col0, col1 = _cols(self.grid, col0, col1)
        indexes = None if self.select is None else [b + 1 for b in self.select]
        db = read_sar_db(self.ds, self.grid, row, col0, nrows, col1 - col0, kernel=self.kernel, scale=self.scale,
                         nodata=self.nodata, indexes=indexes)
        return db, np.all(np.isfinite(db), axis=0)

    def close(self) -> None:
        self.ds.close()


def _cols(g: Grid, col0: int, col1: int | None) -> tuple[int, int]:
    """Column range ``[col0, col1)`` of a strip, the full width by default, checked against the grid."""
    col1 = g.width if col1 is None else int(col1)
    col0 = int(col0)
    if not 0 <= col0 < col1 <= g.width:
        raise ValueError(f"columns [{col0}, {col1}) lie outside the grid's {g.width} columns")
    return col0, col1


__all__ = ["OpticalSource", "SarScale", "SarSource", "open_scene", "scene_nodata"]
