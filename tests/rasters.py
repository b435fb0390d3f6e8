"""Tiny GeoTIFF writer shared by the tests that build rasters by hand."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.transform import from_origin


def write_raster(path, arr: np.ndarray, crs="EPSG:32631", res: float = 1.0, nodata=None,
                 origin=(500000.0, 5600000.0), *, transform=None, tags=None, descriptions=None) -> str:
    """Write ``arr`` ((C, H, W) or (H, W)) north-up at ``origin`` with ``res`` pixels, or on
    ``transform`` when given; ``crs=None`` writes no georeferencing at all (for the bad-input
    tests). ``tags``: dataset tags; ``descriptions``: one band name per band."""
    arr = arr if arr.ndim == 3 else arr[None]
    kw = dict(crs=crs, transform=transform if transform is not None else from_origin(*origin, res, res)) if crs else {}
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, nodata=nodata, **kw) as d:
        d.write(arr)
        if tags:
            d.update_tags(**tags)
        for k, name in enumerate(descriptions or []):
            d.set_band_description(k + 1, name)
    return str(path)
