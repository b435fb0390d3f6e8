"""Bad input to `codemae prepare`: one sentence on stderr, exit code 2, no output left behind."""

from __future__ import annotations

import numpy as np
import pytest
from rasters import write_raster
from typer.testing import CliRunner

from codemae_cli.cli import app


def _raster(path, arr, crs="EPSG:32631", origin=(400000.0, 5500000.0), nodata=None):
    return write_raster(path, arr, crs=crs, nodata=nodata, origin=origin)


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    f = {
        "opt": _raster(tmp_path / "opt.tif", rng.integers(1, 255, (3, 64, 64)).astype(np.uint8), nodata=0),
        "sar": _raster(tmp_path / "sar.tif", rng.uniform(0.01, 1, (2, 64, 64)).astype(np.float32)),
        "far": _raster(tmp_path / "far.tif", rng.uniform(0.01, 1, (2, 64, 64)).astype(np.float32),
                       origin=(500000.0, 5500000.0)),
        "nocrs": _raster(tmp_path / "nocrs.tif", rng.uniform(0.01, 1, (2, 64, 64)).astype(np.float32), crs=None),
        "empty": _raster(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0),
    }
    (tmp_path / "text.tif").write_text("not a raster")
    f["text"] = str(tmp_path / "text.tif")
    import geopandas as gpd
    from shapely.geometry import box

    gpd.GeoDataFrame({"name": ["a"]}, geometry=[box(400001, 5499950, 400010, 5499990)], crs="EPSG:32631").to_file(
        tmp_path / "lab.gpkg")
    f["lab"] = str(tmp_path / "lab.gpkg")
    # valid labels, but 100 km away from the scene (another scene's file, or the wrong CRS)
    gpd.GeoDataFrame({"class": [1]}, geometry=[box(500001, 5499950, 500010, 5499990)], crs="EPSG:32631").to_file(
        tmp_path / "far_lab.gpkg")
    f["far_lab"] = str(tmp_path / "far_lab.gpkg")
    f["out"] = str(tmp_path / "out")
    return f


CASES = {
    "missing file": (["--optical", "{tmp}/nope.tif", "--sar", "{sar}"], "does not exist"),
    "not a raster": (["--optical", "{opt}", "--sar", "{text}"], "not a readable raster"),
    "no CRS": (["--optical", "{opt}", "--sar", "{nocrs}"], "has no CRS"),
    "no overlap": (["--optical", "{opt}", "--sar", "{far}"], "do not overlap"),
    "zero valid chips": (["--optical", "{empty}", "--sar", "{sar}"], "no chip has at least"),
    "no such column": (["--optical", "{opt}", "--sar", "{sar}", "--labels", "{lab}", "--label-column", "kind"],
                       "no column 'kind'"),
    "scene smaller than a chip": (["--optical", "{opt}", "--sar", "{sar}", "--tile", "128"], "smaller than one 128 px chip"),
    "labels elsewhere": (["--optical", "{opt}", "--sar", "{sar}", "--labels", "{far_lab}"], "does not overlap"),
    "bad split": (["--optical", "{opt}", "--sar", "{sar}", "--split", "0.5,0.1"], "must sum to 1"),
    "bad sar scale": (["--optical", "{opt}", "--sar", "{sar}", "--sar-scale", "power"], "--sar-scale"),
    "missing modality": (["--optical", "{opt}"], "give --optical and --sar"),
    "bad manifest": (["--manifest", "{tmp}/m.csv"], "does not exist"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_sentence_exit_2_nothing_left(tmp_path, files, name):
    args, message = CASES[name]
    args = [a.format(tmp=tmp_path, **files) for a in args] + ["-o", files["out"], "--tile", "32", "-q"]
    if "--tile" in CASES[name][0]:
        args = args[:-3] + ["-q"]  # the case's own --tile wins
    res = CliRunner().invoke(app, ["prepare", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1  # one line, no traceback
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_existing_output_refused_and_foreign_dir_not_overwritten(tmp_path, files):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    base = ["prepare", "--optical", files["opt"], "--sar", files["sar"], "-o", files["out"], "--tile", "32", "-q"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output
    res = CliRunner().invoke(app, base + ["--overwrite"])
    assert res.exit_code == 2 and "not a prepared dataset" in res.output
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("out.tmp-*"))
