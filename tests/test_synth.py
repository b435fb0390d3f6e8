"""Synthetic scene generator: georeferencing, determinism, window independence, physics."""

from __future__ import annotations

import numpy as np
import rasterio
from typer.testing import CliRunner

from codemae_cli.data.synth import BUILT, CLASSES, WATER, write_scene_pair


def test_pair_shapes_dtypes_and_grids(tmp_path):
    out = write_scene_pair(tmp_path, 96, 130, seed=3, optical_bands=3, optical_dtype="uint8",
                           sar_bands=2, sar_scale="db", sar_crs="EPSG:3857", res=2.0)
    assert out["classes"] == CLASSES
    with rasterio.open(out["optical"]) as o, rasterio.open(out["sar"]) as s, rasterio.open(out["labels"]) as lab:
        assert (o.height, o.width, o.count, o.dtypes[0]) == (96, 130, 3, "uint8")
        assert o.crs.to_epsg() == 32631 and o.res == (2.0, 2.0) and o.nodata == 0
        assert s.crs.to_epsg() == 3857 and s.count == 2 and s.dtypes[0] == "float32"
        assert lab.transform == o.transform and lab.tags()["CLASSES"] == ",".join(CLASSES)
        assert (o.read() > 0).all()  # never the nodata value
        sar = s.read()
        assert np.isfinite(sar).all() and (sar < 30).all() and (sar > -80).all()  # dB range
        assert set(np.unique(lab.read(1))) <= {0, 1, 2, 3}
        # The SAR raster covers the optical footprint.
        from rasterio.warp import transform_bounds

        ob = transform_bounds(o.crs, s.crs, *o.bounds)
        assert s.bounds.left <= ob[0] + 1e-6 and s.bounds.top >= ob[3] - 1e-6


def test_deterministic_and_independent_of_block_size(tmp_path):
    a = write_scene_pair(tmp_path / "a", 300, 260, seed=5, block=1024)
    b = write_scene_pair(tmp_path / "b", 300, 260, seed=5, block=128)
    with rasterio.open(a["labels"]) as la, rasterio.open(b["labels"]) as lb:
        np.testing.assert_array_equal(la.read(), lb.read())  # structure is a function of position
    with rasterio.open(a["optical"]) as oa, rasterio.open(b["optical"]) as ob:
        # Pixel noise is drawn per window, the signal is not: difference is noise-sized only.
        diff = np.abs(oa.read().astype(float) - ob.read().astype(float))
        assert diff.mean() < 200
    c = write_scene_pair(tmp_path / "c", 300, 260, seed=5, block=1024)
    with rasterio.open(a["sar"]) as sa, rasterio.open(c["sar"]) as sc:
        np.testing.assert_array_equal(sa.read(), sc.read())


def test_water_and_built_up_are_separable_from_sar_alone(tmp_path):
    out = write_scene_pair(tmp_path, 1200, 1200, seed=1, sar_scale="db", block=512)
    with rasterio.open(out["sar"]) as s, rasterio.open(out["labels"]) as lab:
        vv, cls = s.read(1), lab.read(1)
    assert (cls == WATER).mean() > 0.01 and (cls == BUILT).mean() > 0.05
    # A 5x5 box-filtered VV threshold separates the two classes almost perfectly.
    from numpy.lib.stride_tricks import sliding_window_view

    lin = 10 ** (vv / 10)
    smooth = 10 * np.log10(sliding_window_view(np.pad(lin, 2, mode="edge"), (5, 5)).mean(axis=(-1, -2)))
    water, built = smooth[cls == WATER], smooth[cls == BUILT]
    thr = -17.0
    acc = ((water < thr).sum() + (built >= thr).sum()) / (water.size + built.size)
    assert np.median(built) - np.median(water) > 10
    assert acc > 0.95


def test_synth_command(tmp_path):
    from codemae_cli.cli import app

    res = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "s"), "--size", "64", "--sar-scale", "amplitude"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "scene_sar.tif").is_file()
    with rasterio.open(tmp_path / "s" / "scene_sar.tif") as s:
        assert (s.read() > 0).all() and s.tags()["SAR_SCALE"] == "amplitude"
    bad = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "t"), "--size", "64", "--sar-scale", "power"])
    assert bad.exit_code == 2 and "sar_scale" in bad.output


def test_synth_bad_input_one_sentence_nothing_written(tmp_path):
    """An unknown --sar-crs or an output that is a file: exit 2, one sentence, no folder left."""
    from codemae_cli.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "s"), "--size", "16", "--sar-crs", "EPSG:99999"])
    assert res.exit_code == 2 and res.output.startswith("Error: ") and "EPSG:99999" in res.output, res.output
    assert "Traceback" not in res.output and res.output.count("\n") == 1 and not (tmp_path / "s").exists()
    (tmp_path / "f.tif").write_text("a file")
    res = runner.invoke(app, ["synth", "-o", str(tmp_path / "f.tif"), "--size", "16"])
    assert res.exit_code == 2 and "is a file, not a folder" in res.output and res.output.count("\n") == 1, res.output


def test_failure_part_way_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """The SAR stage failing after the optical raster was written: no file replaced or left behind."""
    import pytest

    from codemae_cli.data import synth

    write_scene_pair(tmp_path / "s", 32, 32, seed=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_sar", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_scene_pair(tmp_path / "s", 32, 32, seed=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    with pytest.raises(RuntimeError, match="disk full"):
        write_scene_pair(tmp_path / "new" / "deep", 32, 32)
    assert not (tmp_path / "new").exists()


def test_optical_encoding_never_writes_the_nodata_value():
    from codemae_cli.data.synth import OpticalEncoding

    refl = np.array([0.0, 2 / 255, 3 / 255, 0.5, 1.0], dtype=np.float32)
    below = OpticalEncoding.for_dtype("uint8", 0).encode(refl)  # nodata under the range: a floor of 1
    assert below.dtype == np.uint8 and below.tolist() == [1, 2, 3, 128, 255]
    inside = OpticalEncoding.for_dtype("uint8", 3).encode(refl)  # nodata inside the range: moved off it
    assert inside.tolist() == [0, 2, 4, 128, 255]
    assert OpticalEncoding.for_dtype("float32", None).encode(refl).min() >= 1e-4
