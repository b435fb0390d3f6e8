"""Small frictions a new user met, each pinned: label nodata before the range check, areas in
m^2 in a geographic CRS, CPU threads, output paths refused like predict's."""

from __future__ import annotations

import numpy as np
import pytest
from rasters import write_raster

from codemae_cli.errors import UserError


def test_label_range_checked_after_nodata_and_names_value_and_fix():
    from codemae_cli.data.labels import IGNORE, raster_label_prepare

    block = np.array([[[-1, 0], [1, -1]]], dtype=np.int16)
    out = raster_label_prepare(-1.0, "l.tif")(block)
    assert out.dtype == np.uint8 and out.tolist() == [[[IGNORE, 0], [1, IGNORE]]]
    with pytest.raises(UserError, match=r"'l.tif' holds the value -1, .*--label-nodata -1"):
        raster_label_prepare(None, "l.tif")(block)
    with pytest.raises(UserError, match="value 300"):
        raster_label_prepare(None, "l.tif")(np.array([[[300]]], dtype=np.int16))
    nan = np.array([[[np.nan, 2.0]]], dtype=np.float32)
    assert raster_label_prepare(None)(nan).tolist() == [[[IGNORE, 2]]]


def test_areas_in_square_metres_in_any_crs():
    from shapely.geometry import box

    from codemae_cli.data.areas import area_m2, areas_m2, is_metric

    assert area_m2(box(0, 0, 10, 10), "EPSG:32631") == pytest.approx(100.0)
    # 9e-5 degrees at the equator: 10.02 m x 9.95 m (WGS84 ellipsoid)
    assert area_m2(box(0, 0, 9e-5, 9e-5), "EPSG:4326") == pytest.approx(99.7, rel=2e-3)
    # 60 N: a degree of longitude is half as long
    eq, north = areas_m2([box(10, 0, 10.01, 0.01), box(10, 60, 10.01, 60.01)], "EPSG:4326")
    assert north / eq == pytest.approx(0.5, rel=0.01)
    assert not is_metric("EPSG:4326") and is_metric("EPSG:3857") and not is_metric("EPSG:2263")  # US feet


def test_vectorize_min_area_in_m2_on_a_degree_grid(tmp_path):
    import geopandas as gpd

    from codemae_cli.infer.vectorize import vectorize_classes

    cls = np.zeros((40, 40), np.uint8)
    cls[2:12, 2:12] = 1  # 100 px of ~99.7 m^2
    cls[30:32, 30:32] = 1  # 4 px
    path = tmp_path / "c.tif"
    write_raster(path, cls, crs="EPSG:4326", res=9e-5, origin=(0.0, 0.0036), nodata=255)
    res = vectorize_classes(path, tmp_path / "v.gpkg", classes=[1], min_area=500)
    gdf = gpd.read_file(res["path"])
    assert len(gdf) == 1 and gdf["area"].iloc[0] == pytest.approx(100 * 99.7, rel=5e-3)
    with pytest.raises(UserError, match=r"GeoPackage.*\.gpkg"):
        vectorize_classes(path, tmp_path / "v.tif")


def test_threads_option_env_and_per_process_share(monkeypatch):
    from codemae_cli.threads import choose_threads, physical_cores

    assert choose_threads(3).threads == 3
    with pytest.raises(UserError, match="--threads"):
        choose_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads().threads == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1024")  # many torchrun processes on this node
    assert choose_threads().threads == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert 1 <= choose_threads().threads <= physical_cores()


def test_evaluate_json_refuses_a_missing_folder_like_predict(tmp_path):
    from typer.testing import CliRunner

    from codemae_cli.cli import app
    pred = write_raster(tmp_path / "p.tif", np.zeros((8, 8), np.uint8))
    ref = write_raster(tmp_path / "r.tif", np.zeros((8, 8), np.uint8))
    res = CliRunner().invoke(app, ["evaluate", "--pred", pred, "--ref", ref, "--json", str(tmp_path / "no/m.json")])
    assert res.exit_code == 2 and "does not exist" in res.output
    assert not (tmp_path / "no").exists()


def test_sar_band_selection_is_recorded_and_predict_reads_the_same_bands(tmp_path):
    from pathlib import Path

    import rasterio

    from codemae_cli.data.prepare import run_prepare
    from codemae_cli.infer.sources import SarSource
    from tests.test_flood import flood_chip

    chip = flood_chip(tmp_path / "raw", "Mekong_000001", 64, seed=2)
    meta = run_prepare(out=str(tmp_path / "d"), optical=[str(chip["optical"])], sar=[str(chip["sar"])],
                       sar_bands="2", optical_bands="4,3,2", tile=32, block=1, quicklook=False)
    import json

    md = json.loads((Path(meta["out"]) / "metadata.json").read_text())
    assert md["sar"]["bands"] == ["VH"] and md["sar"]["selected"] == [2] and md["sar"]["count"] == 1
    src = SarSource(chip["sar"], indexes=[2])
    db, valid = src.read_strip(10, 4)
    with rasterio.open(chip["sar"]) as ds:
        vh = ds.read(2, window=((10, 14), (0, 64)))
    assert db.shape == (1, 4, 64) and np.allclose(db[0][valid], vh[valid], atol=1e-4)
    src.close()
    with pytest.raises(UserError, match="has 2 band"):
        SarSource(chip["sar"], indexes=[3])
    with pytest.raises(UserError, match="--sar-bands"):
        run_prepare(out=str(tmp_path / "e"), optical=[str(chip["optical"])], sar=[str(chip["sar"])], sar_bands="0,1")


def test_band_reads_cover_files_stacked_in_any_order():
    from types import SimpleNamespace

    from codemae_cli.data.prepare import _band_reads

    files = [SimpleNamespace(count=1), SimpleNamespace(count=3), SimpleNamespace(count=1)]  # bands 0 | 1 2 3 | 4
    assert _band_reads(files, None) == ([None, None, None], None)
    reads, order = _band_reads(files, [3, 1, 4])
    assert reads == [[], [3, 1], [1]] and order is None  # read file by file: 3, 1, 4 already in order
    reads, order = _band_reads(files, [4, 2, 0])
    assert reads == [[1], [2], [1]]
    assert [[0, 2, 4][i] for i in order] == [4, 2, 0]


def test_evaluate_reference_nodata_is_declared_or_named(tmp_path):
    from codemae_cli.tasks.evaluate import evaluate_raster
    pred = write_raster(tmp_path / "p.tif", np.array([[0, 1], [1, 1]], np.uint8))
    ref = write_raster(tmp_path / "r.tif", np.array([[0, 1], [-9999, 0]], np.int16))
    with pytest.raises(UserError, match="value -9999.*--ref-nodata -9999"):
        evaluate_raster(pred, ref, classes=["dry", "water"])
    m = evaluate_raster(pred, ref, classes=["dry", "water"], ref_nodata=-9999)
    assert m["pixels"] == 3 and m["support"] == [2, 1]  # the -9999 pixel is not scored
