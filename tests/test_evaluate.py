"""``codemae evaluate --pred --ref``: a class raster against a reference raster or vector file,
extents and CRS reconciled onto the prediction's grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from rasters import write_raster  # noqa: E402
from shapely.geometry import box  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from codemae_cli.cli import app  # noqa: E402
from codemae_cli.errors import UserError  # noqa: E402
from codemae_cli.tasks.evaluate import evaluate_raster  # noqa: E402

runner = CliRunner()
ORIGIN = (590000.0, 5760000.0)


def _write(path: Path, data: np.ndarray, crs="EPSG:32631", res=1.0, origin=ORIGIN, nodata=255, **kw) -> Path:
    """A class raster, 255 its declared nodata; ``kw``: ``transform``, ``tags`` (tests/rasters.py)."""
    return Path(write_raster(path, data, crs=crs, res=res, nodata=nodata, origin=origin, **kw))


def test_raster_vs_raster_equals_hand_computed_confusion(tmp_path):
    ref = np.zeros((10, 10), np.uint8)
    ref[:, 5:] = 1
    ref[0, 0] = 255  # ignored
    pred = ref.copy()
    pred[0, 0] = 1
    pred[1:3, 0] = 1  # 2 background pixels called class 1
    pred[9, 9] = 0  # 1 class-1 pixel called background
    p = _write(tmp_path / "pred.tif", pred, tags={"CLASSES": "background,building"})
    r = _write(tmp_path / "ref.tif", ref)
    m = evaluate_raster(p, r)
    assert m["confusion"] == [[47, 2], [1, 49]]
    assert m["classes"] == ["background", "building"]
    assert m["iou"][0] == pytest.approx(47 / 50)
    assert m["iou"][1] == pytest.approx(49 / 52)
    assert m["oa"] == pytest.approx(96 / 99)


def test_reference_on_another_grid_and_crs_is_warped_with_nearest(tmp_path):
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    labels = np.zeros((60, 60), np.uint8)
    labels[10:40, 20:50] = 1
    labels[45:, :] = 2
    p = _write(tmp_path / "pred.tif", labels)
    # the same labels at half the pixel size, extended beyond the prediction, in lon/lat
    fine = np.kron(np.pad(labels, 10, constant_values=2), np.ones((2, 2), np.uint8))
    utm = _write(tmp_path / "fine.tif", fine, res=0.5, origin=(ORIGIN[0] - 10, ORIGIN[1] + 10))
    with rasterio.open(utm) as src:
        tf, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        out = np.full((h, w), 255, np.uint8)
        reproject(fine, out, src_transform=src.transform, src_crs=src.crs, dst_transform=tf, dst_crs="EPSG:4326",
                  resampling=Resampling.nearest, dst_nodata=255)
    r = _write(tmp_path / "ref_wgs84.tif", out, crs="EPSG:4326", transform=tf)
    m = evaluate_raster(p, r)
    assert m["oa"] > 0.97 and m["miou"] > 0.93  # only edge pixels differ after two warps
    assert m["valid_fraction"] > 0.99


def test_vector_reference_with_class_column(tmp_path):
    pred = np.zeros((20, 20), np.uint8)
    pred[0:10, 0:10] = 1
    pred[10:20, 10:15] = 2  # right half of the second square called background (0)
    p = _write(tmp_path / "pred.tif", pred)
    x0, y0 = ORIGIN
    gdf = gpd.GeoDataFrame({"cls": [1, 2]}, geometry=[box(x0, y0 - 10, x0 + 10, y0),
                                                      box(x0 + 10, y0 - 20, x0 + 20, y0 - 10)], crs="EPSG:32631")
    v = tmp_path / "ref.gpkg"
    gdf.to_file(v)
    m = evaluate_raster(p, v, label_column="cls")
    # read as prepare reads vector labels: pixels outside every polygon are background (0), so
    # 200 of class 0 (all right), 100 of class 1 (all right), 100 of class 2 (50 right)
    assert m["pixels"] == 400 and m["classes"] == ["background", "class_1", "class_2"]
    assert m["confusion"] == [[200, 0, 0], [0, 100, 0], [50, 0, 50]]
    # footprints without a column: inside = 1, outside = 0, everywhere on the grid
    binary = _write(tmp_path / "binary.tif", (pred == 1).astype(np.uint8))
    m = evaluate_raster(binary, v)
    assert m["pixels"] == 400 and m["classes"] == ["background", "foreground"]
    assert m["confusion"] == [[200, 0], [100, 100]]
    # a class the names do not cover is refused
    with pytest.raises(UserError, match="class id 2"):
        evaluate_raster(p, v)


def test_real_spacenet_buildings_vector_in_another_crs(real_dir, tmp_path):
    """Real footprints (SpaceNet 4 Atlanta): a class map rasterised from them on a coarser grid
    in lon/lat scores a high building IoU; the same map shifted by 4 m scores clearly lower."""
    from rasterio.features import rasterize
    from rasterio.warp import calculate_default_transform

    vec = real_dir / "spacenet4_atlanta_buildings" / "geotiff_labels.geojson"
    gdf = gpd.read_file(vec).to_crs("EPSG:4326")
    bounds = gpd.read_file(vec).total_bounds
    tf, w, h = calculate_default_transform("EPSG:32616", "EPSG:4326", 450, 450, *bounds)

    def class_map(shift_deg: float, name: str) -> Path:
        shapes = ((g, 1) for g in gdf.translate(xoff=shift_deg).geometry)
        data = rasterize(shapes, out_shape=(h, w), transform=tf, fill=0, dtype="uint8")
        return _write(tmp_path / name, data, crs="EPSG:4326", transform=tf)

    good = evaluate_raster(class_map(0.0, "good.tif"), vec)
    shifted = evaluate_raster(class_map(4.0 / 92000, "shifted.tif"), vec)  # ~4 m east at 33.6 N
    assert good["iou"][1] > 0.85 and good["oa"] > 0.97
    assert shifted["iou"][1] < good["iou"][1] - 0.05


def test_cli_table_and_json(tmp_path):
    pred = np.zeros((8, 8), np.uint8)
    pred[:4] = 1
    p = _write(tmp_path / "pred.tif", pred)
    r = _write(tmp_path / "ref.tif", pred)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", "--pred", str(p), "--ref", str(r), "--classes", "land,water",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "water" in result.output and "100.00" in result.output
    metrics = json.loads(out.read_text())
    assert metrics["miou"] == 1.0 and metrics["classes"] == ["land", "water"]


def test_bad_inputs_are_one_sentence_errors(tmp_path):
    pred = np.zeros((8, 8), np.uint8)
    p = _write(tmp_path / "pred.tif", pred)
    far = _write(tmp_path / "far.tif", pred, origin=(100000.0, 100000.0))
    flt = _write(tmp_path / "float.tif", pred.astype(np.float32), nodata=None)
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    poly = tmp_path / "poly.gpkg"
    gpd.GeoDataFrame({"a": [1]}, geometry=[box(*ORIGIN, ORIGIN[0] + 4, ORIGIN[1] - 4)], crs="EPSG:32631").to_file(poly)
    cases = [
        (["--pred", str(p), "--ref", str(far)], "does not overlap"),
        (["--pred", str(flt), "--ref", str(p)], "floating-point"),
        (["--pred", str(p), "--ref", str(empty)], "has no features"),
        (["--pred", str(p), "--ref", str(poly), "--label-column", "cls"], "no column 'cls'"),
        (["--pred", str(tmp_path / "nope.tif"), "--ref", str(p)], "does not exist"),
        (["--pred", str(p)], "--ref"),
        ([], "either --checkpoint"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, ["evaluate", *args])
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output, result.output
    out = tmp_path / "never.json"
    runner.invoke(app, ["evaluate", "--pred", str(p), "--ref", str(far), "--json", str(out)])
    assert not out.exists()
    with pytest.raises(UserError):
        evaluate_raster(p, far)
