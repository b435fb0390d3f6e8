"""The one GeoTIFF writer of the tests: every test that needs a raster on disk writes it here."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.transform import from_origin

CRS = "EPSG:32631"
ORIGIN = (500000.0, 5600000.0)
_UNSET = object()  # "not given": the value comes from ``like``, else the defaults above


def write_raster(path, arr: np.ndarray, crs=_UNSET, res=_UNSET, nodata=_UNSET, origin=_UNSET, *, transform=None,
                 like=None, tags=None, descriptions=None, **options) -> str:
    """Write ``arr`` ((C, H, W) or (H, W), in its own dtype) as a GeoTIFF at ``path``; returns the path.

    Georeferencing: north-up with square ``res`` pixels (1 m) whose top-left corner is ``origin``
    (``ORIGIN``) in ``crs`` (``CRS``), or ``transform`` when given; ``crs=None`` writes none at all
    (for the bad-input tests). ``nodata``: the declared nodata value (none).

    ``like``: a raster whose profile (CRS, grid, nodata, tiling, compression) the file copies, each
    given argument overriding its part: ``write_raster(p, data, like=src, nodata=None)`` is ``src``
    with new pixels and no nodata tag; ``origin=`` alone moves its grid, ``res=`` alone rescales it.

    ``tags``: dataset tags; ``descriptions``: one band name per band; ``options``: other creation
    options (``tiled=True, blockxsize=16, blockysize=16``, ``compress="deflate"``, ...). An untiled
    file gets GDAL's default strips.
    """
    arr = arr if arr.ndim == 3 else arr[None]
    profile = {"driver": "GTiff", "crs": CRS, "nodata": None}
    if like is not None:
        with rasterio.open(like) as src:
            profile = dict(src.profile)
    for key, value in (("crs", crs), ("nodata", nodata)):
        if value is not _UNSET:
            profile[key] = value
    if transform is not None:
        profile["transform"] = transform
    elif like is None or res is not _UNSET or origin is not _UNSET:
        base = profile.get("transform") or from_origin(*ORIGIN, 1.0, 1.0)  # like's grid, else the default
        step = base.a if res is _UNSET else res
        profile["transform"] = from_origin(*((base.c, base.f) if origin is _UNSET else origin), step, step)
    if profile["crs"] is None:
        profile.pop("transform", None)
    profile.update(width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype=arr.dtype, **options)
    if not profile.get("tiled"):  # a copied strip or tile size need not fit the new shape
        profile.pop("blockxsize", None)
        profile.pop("blockysize", None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)
        if tags:
            dst.update_tags(**tags)
        for k, name in enumerate(descriptions or []):
            dst.set_band_description(k + 1, name)
    return str(path)
