"""Tiny GeoTIFF writer shared by the tests that build rasters by hand."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.transform import from_origin


def write_raster(path, arr: np.ndarray, crs="EPSG:32631", res: float = 1.0, nodata=None,
                 origin=(500000.0, 5600000.0)) -> str:
    """Write ``arr`` ((C, H, W) or (H, W)) north-up at ``origin``; ``crs=None`` writes no
    georeferencing at all (for the bad-input tests)."""
    arr = arr if arr.ndim == 3 else arr[None]
    kw = dict(crs=crs, transform=from_origin(*origin, res, res)) if crs else {}
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, nodata=nodata, **kw) as d:
        d.write(arr)
    return str(path)
