"""Areas in square metres whatever the CRS.

A projected CRS in metres measures areas directly. Anything else (a geographic CRS in degrees,
such as EPSG:4326, or a projection in feet) is measured in a Lambert azimuthal equal-area
projection centred on the geometries, which keeps areas exact at any latitude:

    areas = areas_m2(polygons, crs)           # float64 array, m^2
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pyproj_crs(crs):
    from pyproj import CRS

    if hasattr(crs, "to_wkt"):
        crs = crs.to_wkt()
    return CRS.from_user_input(crs)


def is_metric(crs) -> bool:
    """A projected CRS whose axes are in metres (areas in its units are m^2)."""
    c = _pyproj_crs(crs)
    return bool(c.is_projected) and all(a.unit_name in ("metre", "meter") for a in c.axis_info[:2])


def equal_area_crs(crs, bounds: Sequence[float]):
    """A Lambert azimuthal equal-area CRS centred on ``bounds`` (left, bottom, right, top in ``crs``)."""
    from pyproj import CRS, Transformer

    left, bottom, right, top = bounds
    to_lonlat = Transformer.from_crs(_pyproj_crs(crs), CRS.from_epsg(4326), always_xy=True)
    lon, lat = to_lonlat.transform((left + right) / 2, (bottom + top) / 2)
    return CRS.from_proj4(f"+proj=laea +lat_0={lat:.8f} +lon_0={lon:.8f} +datum=WGS84 +units=m +no_defs")


def areas_m2(geometries: Sequence, crs) -> np.ndarray:
    """Area of each geometry in m^2 (see the module docstring for how)."""
    import geopandas as gpd

    series = gpd.GeoSeries(list(geometries), crs=_pyproj_crs(crs))
    if len(series) == 0:
        return np.zeros(0, dtype=np.float64)
    if is_metric(series.crs):
        return series.area.to_numpy(dtype=np.float64)
    return series.to_crs(equal_area_crs(series.crs, series.total_bounds)).area.to_numpy(dtype=np.float64)


def area_m2(geometry, crs) -> float:
    return float(areas_m2([geometry], crs)[0])


__all__ = ["area_m2", "areas_m2", "equal_area_crs", "is_metric"]
