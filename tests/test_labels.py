"""Labels: vector files rasterised onto the right pixels; label rasters warped nearest."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from rasters import write_raster
from shapely.geometry import box

from codemae_cli.data.coregister import reference_grid
from codemae_cli.data.labels import VectorLabels, parse_classes
from codemae_cli.data.prepare import run_prepare
from codemae_cli.data.raster import open_source
from codemae_cli.data.shards import PreparedDataset
from codemae_cli.errors import UserError


def test_spacenet4_buildings_rasterised_on_the_pan_grid(real_dir):
    folder = real_dir / "spacenet4_atlanta_buildings"
    src = open_source(folder / "sample_geotiff.tif", "optical")
    grid = reference_grid([src])
    labels = VectorLabels(folder / "geotiff_labels.geojson", "building", ["background", "building"], grid.crs_wkt)
    # Whole tile as two bands of rows: the band split must not change anything.
    top = labels.rasterize(grid, 0, 0, 450, 900)
    bottom = labels.rasterize(grid, 450, 0, 450, 900)
    mask = np.concatenate([top, bottom])
    assert set(np.unique(mask)) == {0, 1}
    gdf = gpd.read_file(folder / "geotiff_labels.geojson").to_crs(grid.crs_wkt)
    tile = box(*grid.window_bounds(0, 0, 900, 900))
    inside = gdf.geometry.intersection(tile)
    # Pixel-centre rasterisation: area within a few percent of the polygons' area (0.25 m^2 px).
    assert abs(mask.sum() * 0.25 - inside.union_all().area) / inside.union_all().area < 0.03
    inv = ~grid.transform
    for geom in inside:
        if geom.is_empty or geom.area < 10:
            continue
        p = geom.representative_point()
        c, r = inv @ (p.x, p.y)
        assert mask[int(r), int(c)] == 1
    # A pixel far from every building is background.
    free = np.argwhere(mask == 0)[0]
    assert mask[tuple(free)] == 0


@pytest.fixture()
def pair(tmp_path):
    rng = np.random.default_rng(0)
    opt = write_raster(tmp_path / "o.tif", rng.integers(1, 255, (3, 64, 64)).astype(np.uint8), nodata=0)
    sar = write_raster(tmp_path / "s.tif", rng.uniform(0.01, 1, (2, 64, 64)).astype(np.float32))
    return opt, sar


def test_vector_labels_in_prepare(tmp_path, pair):
    # Rectangles on pixel edges: rows 4..12 x cols 10..30 "building", rows 40..50 x cols 0..8 "water".
    x0, y0 = 500000.0, 5600000.0
    gdf = gpd.GeoDataFrame({"kind": ["building", "water"]},
                           geometry=[box(x0 + 10, y0 - 12, x0 + 30, y0 - 4), box(x0, y0 - 50, x0 + 8, y0 - 40)],
                           crs="EPSG:32631").to_crs("EPSG:4326")  # another CRS on purpose
    gdf.to_file(tmp_path / "lab.gpkg")
    run_prepare(out=str(tmp_path / "out"), optical=[pair[0]], sar=[pair[1]], tile=32,
                labels=str(tmp_path / "lab.gpkg"), label_column="kind", classes="background,building,water",
                quicklook=False, sar_scale="linear")
    ds = PreparedDataset(tmp_path / "out")
    assert ds.classes == ["background", "building", "water"]
    full = np.full((64, 64), 200, np.uint8)
    for i in range(len(ds)):
        r, c = int(ds.index.iloc[i]["row"]), int(ds.index.iloc[i]["col"])
        full[r:r + 32, c:c + 32] = ds.read(i)["label"]
    expected = np.zeros((64, 64), np.uint8)
    expected[4:12, 10:30] = 1
    expected[40:50, 0:8] = 2
    # Reprojection to EPSG:4326 and back moves edges by micrometres: compare away from edges.
    diff = full != expected
    assert diff.sum() == 0 or diff.sum() <= 4, np.argwhere(diff)


def test_text_values_without_classes_get_codes_after_background(tmp_path, pair):
    gdf = gpd.GeoDataFrame({"class": ["tree", "house", "tree"]},
                           geometry=[box(500001, 5599990, 500005, 5599995), box(500020, 5599970, 500030, 5599960),
                                     box(500040, 5599940, 500050, 5599930)], crs="EPSG:32631")
    gdf.to_file(tmp_path / "l.geojson")
    grid = reference_grid([open_source(pair[0], "o")])
    v = VectorLabels(tmp_path / "l.geojson", None, None, grid.crs_wkt)
    assert v.classes == {"0": "background", "1": "house", "2": "tree"}
    m = v.rasterize(grid, 0, 0, 64, 64)
    assert m[7, 2] == 2 and m[35, 25] == 1 and m[0, 63] == 0


def test_label_raster_warped_nearest_with_nodata(tmp_path, pair):
    lab = np.zeros((32, 32), np.uint8)
    lab[:, 16:] = 3
    lab[:4, :4] = 9  # nodata
    # Label raster at 2 m resolution: nearest keeps class codes, nodata -> 255.
    path = write_raster(tmp_path / "lab.tif", lab, res=2.0, nodata=9)
    run_prepare(out=str(tmp_path / "out"), optical=[pair[0]], sar=[pair[1]], tile=64, labels=path,
                classes="a,b,c,d", quicklook=False, sar_scale="linear")
    ds = PreparedDataset(tmp_path / "out")
    got = ds.read(0)["label"]
    assert set(np.unique(got)) == {0, 3, 255}
    assert (got[:8, :8] == 255).all() and (got[8:, :32] == 0).all() and (got[:, 32:] == 3).all()
    assert ds.meta["labels"]["classes"] == {"0": "a", "1": "b", "2": "c", "3": "d"}


def test_label_errors(tmp_path, pair):
    gdf = gpd.GeoDataFrame({"name": ["x"]}, geometry=[box(500001, 5599990, 500005, 5599995)], crs="EPSG:32631")
    gdf.to_file(tmp_path / "l.gpkg")
    with pytest.raises(UserError, match="no column 'kind'"):
        VectorLabels(tmp_path / "l.gpkg", "kind", None, "EPSG:32631")
    # no class column named and no 'class' column: footprints, inside = 1
    v = VectorLabels(tmp_path / "l.gpkg", None, None, "EPSG:32631")
    assert v.column is None and v.names == ["background", "foreground"] and v.gdf["_code"].tolist() == [1]
    with pytest.raises(UserError, match="need two class names"):
        VectorLabels(tmp_path / "l.gpkg", None, ["building"], "EPSG:32631")
    with pytest.raises(UserError, match="not one of --classes"):
        VectorLabels(tmp_path / "l.gpkg", "name", ["background", "y", "z"], "EPSG:32631")
    with pytest.raises(UserError):
        parse_classes("a,,b")
    with pytest.raises(UserError):
        parse_classes("a,a")


def test_evaluate_reads_a_vector_reference_as_prepare_rasterises_it(tmp_path, pair):
    """One reader of vector labels: a prediction equal to prepare's labels scores perfectly when
    evaluated against the same vector file with the same options, over the whole grid (pixels
    outside every polygon are background in both), whatever the file's CRS."""
    from codemae_cli.tasks.evaluate import evaluate_raster

    x0, y0 = 500000.0, 5600000.0
    gdf = gpd.GeoDataFrame({"class": ["building", "water", "building"]},
                           geometry=[box(x0 + 10.3, y0 - 12, x0 + 30, y0 - 4.6), box(x0, y0 - 50, x0 + 8, y0 - 40),
                                     box(x0 + 40, y0 - 30, x0 + 52.5, y0 - 20)],
                           crs="EPSG:32631").to_crs("EPSG:4326")
    gdf.to_file(tmp_path / "lab.gpkg")
    grid = reference_grid([open_source(pair[0], "o")])
    names = ["background", "building", "water"]
    for column, classes in (("class", names), ("class", None), (None, names)):
        labels = VectorLabels(tmp_path / "lab.gpkg", column, classes, grid.crs_wkt)
        assert list(labels.classes.values()) == names
        trained = labels.rasterize(grid, 0, 0, 64, 64)
        assert set(np.unique(trained)) == {0, 1, 2}
        pred = write_raster(tmp_path / "pred.tif", trained, nodata=255)
        m = evaluate_raster(pred, tmp_path / "lab.gpkg", label_column=column, classes=classes)
        assert m["classes"] == names and m["pixels"] == 64 * 64
        assert m["miou"] == 1.0, (column, classes, m["confusion"])
