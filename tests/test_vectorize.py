"""Polygons from the final class raster: whole across window borders, min area, simplification."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from rasters import write_raster

from codemae_cli.errors import UserError
from codemae_cli.infer.vectorize import vectorize_classes


@pytest.fixture()
def class_raster(tmp_path):
    data = np.zeros((100, 120), np.uint8)
    data[10:70, 20:90] = 1  # one big building crossing any 64 px window border
    data[80:83, 5:8] = 1  # 9 px: dropped by min_area below
    data[0:5, 0:5] = 255  # nodata: never a polygon
    path = tmp_path / "cls.tif"
    write_raster(path, data, crs="EPSG:32616", res=0.5, nodata=255, origin=(740000.0, 3730000.0))
    return path


def test_polygons_per_class(class_raster, tmp_path):
    out = tmp_path / "v.gpkg"
    s = vectorize_classes(class_raster, out, class_names=["background", "building"], classes=[1], min_area=5.0)
    gdf = gpd.read_file(out)
    assert gdf.crs.to_epsg() == 32616
    assert len(gdf) == s["polygons"] == 1  # the big one, whole; the 2.25 m^2 one dropped
    assert gdf.class_name.tolist() == ["building"] and gdf.class_id.tolist() == [1]
    assert gdf.area.iloc[0] == pytest.approx(60 * 70 * 0.25)
    minx, miny, maxx, maxy = gdf.total_bounds
    assert (minx, maxy) == pytest.approx((740000.0 + 20 * 0.5, 3730000.0 - 10 * 0.5))


def test_all_classes_and_simplify(class_raster, tmp_path):
    out = tmp_path / "v.gpkg"
    s = vectorize_classes(class_raster, out, class_names=["background", "building"], simplify=1.0)
    gdf = gpd.read_file(out)
    assert set(gdf.class_name) == {"background", "building"}
    assert s["per_class"]["building"] == 2
    assert not (tmp_path / "v.gpkg").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_output(class_raster, tmp_path):
    with pytest.raises(UserError):
        vectorize_classes(class_raster, tmp_path / "nope" / "v.gpkg")
    with pytest.raises(UserError):
        vectorize_classes(class_raster, tmp_path / "v.gpkg", min_area=-1)
