"""Reference grid and overlap of prepare's inputs.

The reference grid is explicit: by default the finest-resolution raster of the reference
modality (optical unless ``--ref sar``), optionally re-projected to ``--crs`` and/or resampled
to ``--res``. Every raster then reaches it through :func:`codemae_cli.data.geo.read_on_grid`
with the resampling policy of :func:`codemae_cli.data.geo.resampling_kernel` (read directly
when on the grid; nearest for labels; average for a source more than 1.5x finer than the grid,
bilinear otherwise), the same reader and policy ``predict`` uses.
"""

from __future__ import annotations

import math
from typing import Optional

from codemae_cli.data.geo import Grid
from codemae_cli.data.raster import RasterSource
from codemae_cli.errors import UserError


def reference_grid(
    sources: list[RasterSource], crs: Optional[str] = None, res: Optional[float] = None
) -> Grid:
    """Grid of the finest source of the reference modality, optionally in ``crs`` at ``res``."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.transform import from_origin
    from rasterio.warp import calculate_default_transform

    base = min(sources, key=lambda s: s.pixel_size).grid  # first of the finest (stable)
    if crs is None and res is None and not base.rotated:
        return base
    if crs is not None:
        try:
            dst_crs = CRS.from_user_input(crs)
        except CRSError:
            raise UserError(f"--crs '{crs}' is not a CRS rasterio understands (try EPSG:32631)") from None
    else:
        dst_crs = base.crs
    if res is not None and not res > 0:
        raise UserError("--res must be a positive pixel size in units of the reference CRS")
    left, bottom, right, top = base.bounds
    if dst_crs == base.crs:
        # Same CRS (new pixel size, or a rotated source made north-up): keep the extent.
        r = float(res) if res is not None else base.pixel_size
        width = max(1, int(math.floor((right - left) / r + 1e-9)))
        height = max(1, int(math.floor((top - bottom) / r + 1e-9)))
        return Grid(dst_crs, from_origin(left, top, r, r), width, height)
    kwargs = {"resolution": float(res)} if res is not None else {}
    transform, width, height = calculate_default_transform(
        base.crs, dst_crs, base.width, base.height, left=left, bottom=bottom, right=right, top=top, **kwargs
    )
    return Grid(dst_crs, transform, width, height)


def footprint(src: Grid, dst_crs):
    """A grid's outline polygon in ``dst_crs`` (densified edges, so curved edges survive)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp_transform
    from shapely.geometry import Polygon

    xs, ys = src.outline()
    dst = dst_crs if isinstance(dst_crs, CRS) else CRS.from_user_input(dst_crs)
    if src.crs != dst:
        xs, ys = warp_transform(src.crs, dst, xs.tolist(), ys.tolist())
    poly = Polygon(zip(xs, ys, strict=True))
    return poly if poly.is_valid else poly.buffer(0)


def overlap_window(grid: Grid, polygons) -> tuple[tuple[int, int, int, int], float]:
    """Pixel window ``(row, col, height, width)`` of ``grid`` inside every polygon's bounding box
    (whole pixels, rounded inward), and the area of the polygons' intersection (CRS units^2)."""
    from rasterio.windows import from_bounds
    from shapely.geometry import box

    inter = box(*grid.bounds)
    for p in polygons:
        inter = inter.intersection(p)
    if inter.is_empty or inter.area <= 0:
        return (0, 0, 0, 0), 0.0
    win = from_bounds(*inter.bounds, transform=grid.transform)
    c0 = max(0, int(math.ceil(win.col_off - 1e-6)))
    r0 = max(0, int(math.ceil(win.row_off - 1e-6)))
    c1 = min(grid.width, int(math.floor(win.col_off + win.width + 1e-6)))
    r1 = min(grid.height, int(math.floor(win.row_off + win.height + 1e-6)))
    if c1 <= c0 or r1 <= r0:
        return (0, 0, 0, 0), float(inter.area)
    return (r0, c0, r1 - r0, c1 - c0), float(inter.area)
