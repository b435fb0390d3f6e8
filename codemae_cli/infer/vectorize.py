"""Polygons from a finished class raster (GeoPackage, in the raster's CRS).

Vectorising the FINAL class raster, not the windows, is what keeps polygons whole across window
borders. ``rasterio.features.shapes`` traces connected regions of equal class (8-connected
would join diagonal neighbours across other classes, so 4-connectivity is used); regions smaller
than ``min_area`` m^2 are dropped (areas in m^2 in any CRS: equal-area for geographic ones, see
``codemae_cli.data.areas``), and the rest are simplified with a topology-preserving tolerance in
CRS units. The ``area`` column is in m^2 too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from codemae_cli.errors import UserError


def check_vector_path(path: str | Path) -> None:
    """Polygons are written as a GeoPackage: refuse a path that names another format."""
    if Path(path).suffix.lower() != ".gpkg":
        raise UserError(f"--vectorize writes a GeoPackage: give a path ending in .gpkg, not '{path}'")


def vectorize_classes(
    raster_path: str | Path,
    out_path: str | Path,
    *,
    class_names: list[str] | None = None,
    classes: list[int] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    layer: str = "predictions",
) -> dict:
    """Write one polygon per connected region of each class of ``raster_path`` to ``out_path``.

    ``classes``: the class ids to keep (default: every class present, nodata excluded).
    Returns ``{"path", "polygons", "per_class": {name: count}}``. Written atomically.
    """
    import geopandas as gpd
    import rasterio
    from rasterio.features import shapes
    from shapely.geometry import shape

    from codemae_cli.data.areas import areas_m2
    from codemae_cli.fsutil import check_writable, staged_file

    check_vector_path(out_path)
    out = check_writable(out_path, "the vector output", create_parents=False)
    if min_area < 0 or simplify < 0:
        raise UserError("the minimum area and the simplification tolerance must not be negative")
    records: list[dict] = []
    with rasterio.open(raster_path) as ds:
        crs = ds.crs
        nodata = ds.nodata
        data = ds.read(1)  # the class map is uint8: W x H bytes (a 20000^2 scene is 400 MB)
        valid = np.ones(data.shape, dtype=bool) if nodata is None else data != nodata
        if classes is not None:
            valid &= np.isin(data, np.asarray(classes, dtype=data.dtype))
        regions = [(shape(geom), int(value)) for geom, value in
                   shapes(data, mask=valid, connectivity=4, transform=ds.transform)]
    areas = areas_m2([poly for poly, _ in regions], crs) if crs is not None and regions else (
        np.array([poly.area for poly, _ in regions], dtype=np.float64))
    for (poly, cid), area in zip(regions, areas, strict=True):
        if area < min_area:
            continue
        if simplify > 0:
            poly = poly.simplify(simplify, preserve_topology=True)
            if poly.is_empty:
                continue
        name = class_names[cid] if class_names and cid < len(class_names) else str(cid)
        records.append({"class_id": cid, "class_name": name, "area": float(area), "geometry": poly})
    gdf = gpd.GeoDataFrame(records, columns=["class_id", "class_name", "area", "geometry"], geometry="geometry", crs=crs)
    with staged_file(out, ".gpkg") as tmp:
        gdf.to_file(tmp, layer=layer, driver="GPKG")
    per_class: dict[str, int] = {}
    for rec in records:
        per_class[rec["class_name"]] = per_class.get(rec["class_name"], 0) + 1
    return {"path": str(out), "polygons": len(records), "per_class": per_class}


__all__ = ["check_vector_path", "vectorize_classes"]
