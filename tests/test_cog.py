"""The prediction writer: tiled windowed writes, then a Cloud-Optimised GeoTIFF with overviews."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from codemae_cli.data.geo import Grid
from codemae_cli.errors import UserError
from codemae_cli.fsutil import check_writable
from codemae_cli.infer.cog import TiledWriter, is_cog, temp_sibling, write_cog


def test_windowed_rows_then_cog(tmp_path):
    grid = Grid(CRS.from_epsg(32631), from_origin(500000, 5700000, 2, 2), width=600, height=700)
    classes = (np.arange(700)[:, None] // 50 + np.arange(600)[None, :] // 50) % 3
    classes = classes.astype(np.uint8)
    classes[:10, :10] = 255
    tmp = temp_sibling(tmp_path / "out.tif", ".part.tif")
    assert tmp.parent == tmp_path and tmp.name.startswith(".out.tif.")
    w = TiledWriter(tmp, grid, 1, "uint8", 255, tags={"codemae_model": "tiny"}, descriptions=["class"],
                    colormap={0: (1, 2, 3, 255), 1: (4, 5, 6, 255), 2: (7, 8, 9, 255)})
    for r in range(0, 700, 90):  # row bands not aligned with the 256 px tiles
        w.write_rows(r, classes[r : r + 90])
    w.close()
    out = tmp_path / "out.tif"
    write_cog(tmp, out, blocksize=256, overview_resampling="mode")
    assert is_cog(out)
    assert not is_cog(tmp)
    with rasterio.open(out) as ds:
        assert ds.crs == grid.crs and ds.transform == grid.transform
        assert ds.nodata == 255 and ds.tags()["codemae_model"] == "tiny"
        assert ds.colormap(1)[1] == (4, 5, 6, 255)
        assert ds.profile["compress"] == "deflate" and ds.profile["blockxsize"] == 256
        np.testing.assert_array_equal(ds.read(1), classes)
        assert ds.overviews(1) == [2, 4]
        ov = ds.read(1, out_shape=(175, 150))  # served from the x4 overview
    # mode overviews never invent a class
    assert set(np.unique(ov)) <= {0, 1, 2, 255}


def test_output_path_checks(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.tif", create_parents=False)
    with pytest.raises(UserError, match="is a directory"):
        check_writable(tmp_path, create_parents=False)
    assert check_writable(tmp_path / "x.tif", create_parents=False) == tmp_path / "x.tif"
