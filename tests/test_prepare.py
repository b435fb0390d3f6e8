"""`codemae prepare` end to end: nodata, validity filter, footprints, stats, split, manifest,
workers, and the real samples (SpaceNet 6 pair, BigEarthNet S1/S2, SLC)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasters import write_raster
from typer.testing import CliRunner

from codemae_cli.cli import app
from codemae_cli.data.prepare import run_prepare
from codemae_cli.data.shards import PreparedDataset

X0, Y0 = 400000.0, 5500000.0


def _raster(path, arr, crs="EPSG:32631", res=2.0, nodata=None, origin=(X0, Y0)):
    return write_raster(path, arr, crs=crs, res=res, nodata=nodata, origin=origin)


@pytest.fixture()
def holes(tmp_path):
    """128 x 128 pair: optical nodata 0 in columns 0..39, SAR NaN in rows 0..23 (linear power)."""
    rng = np.random.default_rng(0)
    opt = rng.integers(1, 255, (3, 128, 128)).astype(np.uint8)
    opt[:, :, :40] = 0
    opt[0, 100:, 100:] = 0  # one band at 0 is a legitimate dark value, not nodata
    sar = rng.uniform(0.01, 1.0, (2, 128, 128)).astype(np.float32)
    sar[:, :24, :] = np.nan
    return _raster(tmp_path / "opt.tif", opt, nodata=0), _raster(tmp_path / "sar.tif", sar), opt, sar


def _dataset_arrays(ds):
    return [ds.read(i) for i in range(len(ds))]


def test_nodata_validity_footprints_and_stats(tmp_path, holes):
    opt_path, sar_path, opt, sar = holes
    res = CliRunner().invoke(app, ["prepare", "--optical", opt_path, "--sar", sar_path, "-o", str(tmp_path / "out"),
                                   "--tile", "32", "--min-valid", "0.3", "--sar-scale", "linear", "--block", "1",
                                   "--split", "0.5,0.25,0.25", "-q"])
    assert res.exit_code == 0, res.output
    ds = PreparedDataset(tmp_path / "out")
    meta = ds.meta
    assert meta["tile"] == 32 and meta["optical"]["nodata"] == 0 and meta["sar"]["input_scale"] == "linear"
    assert meta["optical"]["source_dtype"] == "uint8" and meta["sar"]["scale"] == "db"
    idx = ds.index
    # 4 x 4 candidates; column 0 has no optical (dropped), row 0 has only 8/32 SAR rows (joint 0.25 < 0.3).
    assert meta["dropped"] == {"low_valid": 3, "no_optical": 4}
    assert len(ds) == 9 and sum(meta["splits"].values()) == 9
    for i, item in enumerate(_dataset_arrays(ds)):
        r, c = int(idx.iloc[i]["row"]), int(idx.iloc[i]["col"])
        # Footprint equals the chip window's bounds on the reference grid.
        assert idx.geometry.iloc[i].bounds == pytest.approx((X0 + 2 * c, Y0 - 2 * (r + 32), X0 + 2 * (c + 32), Y0 - 2 * r))
        o = opt[:, r:r + 32, c:c + 32].astype(np.float32)
        invalid = (opt[:, r:r + 32, c:c + 32] == 0).all(axis=0)
        o[:, invalid] = np.nan
        np.testing.assert_array_equal(item["optical"], o)
        s_db = 10 * np.log10(sar[:, r:r + 32, c:c + 32])
        # SAR is stored in steps of 1/256 dB: within half a step; NaN where NaN.
        np.testing.assert_allclose(item["sar"], s_db, rtol=0, atol=2.0**-9 + 1e-6)
        vo, vs = ~invalid, np.isfinite(s_db[0])
        assert idx.iloc[i]["valid_optical"] == pytest.approx(vo.mean())
        assert idx.iloc[i]["valid_sar"] == pytest.approx(vs.mean())
        assert idx.iloc[i]["valid_joint"] == pytest.approx((vo & vs).mean())
        assert idx.iloc[i]["valid_joint"] >= 0.3
    # Stats: a direct numpy computation over the valid pixels of the train chips.
    train = [ds.read(i) for i in ds.indices("train")]
    assert train
    for m in ("optical", "sar"):
        stack = np.stack([t[m] for t in train]).astype(np.float64)
        flat = stack.transpose(1, 0, 2, 3).reshape(stack.shape[1], -1)
        np.testing.assert_allclose(meta["stats"][m]["mean"], np.nanmean(flat, axis=1), rtol=1e-9)
        np.testing.assert_allclose(meta["stats"][m]["std"], np.nanstd(flat, axis=1), rtol=1e-9)
    assert (tmp_path / "out" / "quicklook.png").stat().st_size > 1000
    assert not list(tmp_path.glob("out.tmp-*"))


def test_nodata_override_makes_zero_valid(tmp_path, holes):
    opt_path, sar_path, *_ = holes
    s = run_prepare(out=str(tmp_path / "o"), optical=[opt_path], sar=[sar_path], tile=32, nodata_optical="none",
                    min_valid=0.0, sar_scale="linear", quicklook=False)
    ds = PreparedDataset(tmp_path / "o")
    assert (ds.index["valid_optical"] == 1.0).all()
    assert s["dropped"] == {} and s["chips"] == 16  # min_valid 0: any valid joint pixel keeps a chip


def test_split_is_spatial_and_reproducible(tmp_path):
    rng = np.random.default_rng(1)
    opt = _raster(tmp_path / "o.tif", rng.integers(1, 255, (1, 256, 256)).astype(np.uint8))
    sar = _raster(tmp_path / "s.tif", rng.uniform(-20, -5, (1, 256, 256)).astype(np.float32))
    splits = []
    for k in range(2):
        run_prepare(out=str(tmp_path / f"d{k}"), optical=[opt], sar=[sar], tile=16, block=4, seed=7,
                    quicklook=False)
        splits.append(PreparedDataset(tmp_path / f"d{k}").index)
    assert list(splits[0]["split"]) == list(splits[1]["split"])
    idx = splits[0]
    assert PreparedDataset(tmp_path / "d0").meta["sar"]["input_scale"] == "db"  # auto: negative floats
    blocks = idx.assign(b=(idx["row"] // 64).astype(str) + "_" + (idx["col"] // 64).astype(str))
    assert (blocks.groupby("b")["split"].nunique() == 1).all()  # a block never straddles splits
    counts = idx["split"].value_counts()
    # 16 blocks of 16 chips dealt 0.8/0.1/0.1 by largest remainder: 13, 2, 1 blocks.
    assert counts.to_dict() == {"train": 13 * 16, "val": 2 * 16, "test": 16}


def test_manifest_workers_and_overwrite(tmp_path):
    from codemae_cli.data.synth import write_scene_pair

    write_scene_pair(tmp_path / "a", 96, 96, seed=1, sar_crs="EPSG:32632", labels=True)
    b = write_scene_pair(tmp_path / "b", 96, 128, seed=2, labels=True, origin=(591000.0, 5760000.0))
    (tmp_path / "m.csv").write_text(
        "scene_id,optical,sar,labels\n"
        f"one,a/scene_optical.tif,a/scene_sar.tif,a/scene_labels.tif\n"
        f"two,{b['optical']},{b['sar']},{b['labels']}\n")
    base = dict(manifest=str(tmp_path / "m.csv"), tile=32, quicklook=False, sar_scale="linear")
    s1 = run_prepare(out=str(tmp_path / "w1"), **base)
    s2 = run_prepare(out=str(tmp_path / "w2"), workers=2, **base)
    assert s1["chips"] == s2["chips"] == 9 + 12 and s1["scenes"] == 2
    d1, d2 = PreparedDataset(tmp_path / "w1"), PreparedDataset(tmp_path / "w2")
    assert list(d1.index["chip_id"]) == list(d2.index["chip_id"])
    assert d1.classes == ["water", "vegetation", "bare", "built-up"]
    for i in range(len(d1)):
        x, y = d1.read(i), d2.read(i)
        np.testing.assert_array_equal(x["optical"], y["optical"])
        np.testing.assert_array_equal(x["sar"], y["sar"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert d1.meta["stats"] == d2.meta["stats"] or np.allclose(
        d1.meta["stats"]["sar"]["mean"], d2.meta["stats"]["sar"]["mean"], rtol=1e-9)
    # Re-run into the same output: refused, then replaced with --overwrite.
    res = CliRunner().invoke(app, ["prepare", "--manifest", str(tmp_path / "m.csv"), "-o", str(tmp_path / "w1"),
                                   "--tile", "64", "-q"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(app, ["prepare", "--manifest", str(tmp_path / "m.csv"), "-o", str(tmp_path / "w1"),
                                   "--tile", "64", "-q", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert PreparedDataset(tmp_path / "w1").tile == 64


def test_spacenet6_sample_pair(tmp_path, sample_pair):
    rgb, sar = sample_pair
    res = CliRunner().invoke(app, ["prepare", "--optical", str(rgb), "--sar", str(sar), "-o", str(tmp_path / "sn6"),
                                   "--tile", "64", "--stride", "48"])
    assert res.exit_code == 0, res.output
    assert "chips kept" in res.output and "on the reference grid" in res.output
    ds = PreparedDataset(tmp_path / "sn6")
    m = ds.meta
    assert m["optical"]["count"] == 3 and m["sar"]["count"] == 4 and m["sar"]["input_scale"] == "db"
    assert m["scenes"][0]["resampling"] == {"optical": ["none"], "sar": ["none"]}
    assert m["shards"]["optical"] == "uint8" and m["shards"]["sar"] == "int16"
    assert len(ds) > 0 and m["dropped"].get("no_sar", 0) + m["dropped"].get("low_valid", 0) > 0  # swath edge
    with rasterio.open(sar) as src:
        r, c = int(ds.index.iloc[0]["row"]), int(ds.index.iloc[0]["col"])
        direct = src.read(window=((r, r + 64), (c, c + 64)))
    np.testing.assert_allclose(ds.read(0)["sar"], direct, atol=2.0**-9 + 1e-4)  # dB -> power -> dB, 1/256 dB steps


def test_bigearthnet_pair_with_10_20_60_m_bands(tmp_path, real_dir):
    s2 = next((real_dir / "bigearthnet_s1s2" / "BigEarthNet-S2-Example").glob("*_87_48"))
    s1 = next((real_dir / "bigearthnet_s1s2" / "BigEarthNet-S1-Example").glob("*_87_48"))
    s = run_prepare(out=str(tmp_path / "ben"), optical=[str(s2)], sar=[str(s1 / "*_VV.tif"), str(s1 / "*_VH.tif")],
                    tile=40, quicklook=True)
    ds = PreparedDataset(tmp_path / "ben")
    assert s["chips"] == 9 and ds.meta["res"] == [10.0, 10.0]
    assert ds.meta["optical"]["bands"][:4] == ["B01", "B02", "B03", "B04"] and ds.meta["optical"]["count"] == 12
    assert ds.meta["sar"]["bands"] == ["VV", "VH"]
    rs = ds.meta["scenes"][0]["resampling"]["optical"]
    assert rs[1] == "none" and rs[0] == "bilinear" and rs.count("none") == 4  # 10 m bands read as is
    with rasterio.open(next(s2.glob("*_B02.tif"))) as src:
        b02 = src.read(1, window=((0, 40), (0, 40))).astype(np.float32)
    row0 = ds.index[(ds.index["row"] == 0) & (ds.index["col"] == 0)].index[0]
    np.testing.assert_array_equal(ds.read(row0)["optical"][1], b02)
    assert np.isfinite(ds.read(row0)["optical"]).all()


def test_slc_input_becomes_intensity(tmp_path, real_dir, sample_pair):
    rgb, _ = sample_pair
    s = run_prepare(out=str(tmp_path / "slc"), optical=[str(rgb)],
                    sar=[str(real_dir / "spacenet6_rotterdam" / "sar_hh.tif")], tile=64, quicklook=False)
    ds = PreparedDataset(tmp_path / "slc")
    assert ds.meta["sar"]["input_scale"] == "slc" and s["chips"] >= 1
    sar = ds.read(0)["sar"]
    assert np.isfinite(sar).mean() > 0.5 and np.nanmax(sar) < 200
    # Uncalibrated SLC intensities reach about 90 dB: still within the fixed-point range.
    assert ds.meta["shards"]["sar"] == "int16" and 80 < np.nanmax(sar) < 128


def test_yaml_manifest_with_band_lists(tmp_path):
    from codemae_cli.data.manifest import read_manifest
    from codemae_cli.errors import UserError

    (tmp_path / "m.yaml").write_text(
        "scenes:\n"
        "  - scene_id: x\n    optical: [b/B02.tif, b/B03.tif]\n    sar: s/vv.tif\n    labels: l.gpkg\n"
        "  - optical: /abs/o.tif\n    sar: [/abs/s.tif]\n")
    scenes = read_manifest(tmp_path / "m.yaml")
    assert scenes[0].optical == [str(tmp_path / "b/B02.tif"), str(tmp_path / "b/B03.tif")]
    assert scenes[0].sar == [str(tmp_path / "s/vv.tif")] and scenes[0].labels == str(tmp_path / "l.gpkg")
    assert scenes[1].optical == ["/abs/o.tif"] and scenes[1].scene_id is None and scenes[1].labels is None
    (tmp_path / "bad.yaml").write_text("- optical: a.tif\n  sar: b.tif\n  lables: c.gpkg\n")
    with pytest.raises(UserError, match="unknown key 'lables'"):
        read_manifest(tmp_path / "bad.yaml")
    (tmp_path / "bad.csv").write_text("optical,radar\na.tif,b.tif\n")
    with pytest.raises(UserError, match="no 'sar' column"):
        read_manifest(tmp_path / "bad.csv")


def test_sar_as_reference_grid(tmp_path, real_dir, sample_pair):
    """--ref sar: the rotated SLC grid becomes a north-up 2.5 m grid; the optical is warped."""
    rgb, _ = sample_pair
    run_prepare(out=str(tmp_path / "r"), optical=[str(rgb)], sar=[str(real_dir / "spacenet6_rotterdam" / "sar_hh.tif")],
                tile=64, ref="sar", quicklook=False)
    ds = PreparedDataset(tmp_path / "r")
    assert ds.meta["ref"] == "sar" and ds.meta["res"][0] == pytest.approx(2.5, rel=1e-3)
    assert ds.meta["scenes"][0]["resampling"]["optical"] == ["bilinear"] and len(ds) >= 4
    assert np.isfinite(ds.read(0)["optical"]).any()


def test_row_segments_do_not_change_the_chips(tmp_path, holes, monkeypatch):
    import codemae_cli.data.prepare as prep

    opt_path, sar_path, *_ = holes
    run_prepare(out=str(tmp_path / "a"), optical=[opt_path], sar=[sar_path], tile=32, stride=24, quicklook=False)
    monkeypatch.setattr(prep, "SEGMENT_PX", 40)  # one chip per segment
    run_prepare(out=str(tmp_path / "b"), optical=[opt_path], sar=[sar_path], tile=32, stride=24, quicklook=False)
    a, b = PreparedDataset(tmp_path / "a"), PreparedDataset(tmp_path / "b")
    assert list(a.index["chip_id"]) == list(b.index["chip_id"]) and len(a) > 0
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read(i)["optical"], b.read(i)["optical"])
        np.testing.assert_array_equal(a.read(i)["sar"], b.read(i)["sar"])
    assert a.meta["stats"] == b.meta["stats"]


def test_resume_after_interruption(tmp_path, holes, monkeypatch):
    import codemae_cli.data.prepare as prep
    from codemae_cli.errors import UserError

    opt_path, sar_path, *_ = holes
    kw = dict(optical=[opt_path], sar=[sar_path], tile=16, shard_size=16, quicklook=False, sar_scale="linear")
    run_prepare(out=str(tmp_path / "clean"), **kw)
    calls = {"n": 0}
    real = prep._process_rows

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(prep, "_process_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(out=str(tmp_path / "out"), resume=True, **kw)
    partial = tmp_path / "out.partial"
    assert len(list((partial / "done").glob("*.json"))) == 2 and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="other inputs or options"):
        run_prepare(out=str(tmp_path / "out"), resume=True, **dict(kw, min_valid=0.9))
    calls["n"] = -100  # no more failures
    run_prepare(out=str(tmp_path / "out"), resume=True, **kw)
    assert calls["n"] < -100 + 8  # only the unfinished tasks ran again (8 chip rows in all)
    assert not partial.exists()
    a, b = PreparedDataset(tmp_path / "clean"), PreparedDataset(tmp_path / "out")
    assert list(a.index["chip_id"]) == list(b.index["chip_id"])
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read(i)["sar"], b.read(i)["sar"])
    assert a.meta["stats"] == b.meta["stats"] and a.meta["splits"] == b.meta["splits"]


def test_sar_scale_checks_honour_the_nodata_sar_override(tmp_path):
    """A fill the SAR file does not declare (-9999 in linear power) is not a dB value once
    --nodata-sar names it: neither the declared-scale check nor auto detection looks at it, in
    prepare and in predict alike."""
    from pathlib import Path

    from codemae_cli.data.raster import check_sar_scale, open_source, parse_nodata
    from codemae_cli.errors import UserError
    from codemae_cli.infer.run import PredictPlan, resolve_input_rules
    from codemae_cli.train.checkpoint import CheckpointMeta

    rng = np.random.default_rng(3)
    opt = _raster(tmp_path / "o.tif", rng.integers(1, 255, (3, 64, 64)).astype(np.uint8))
    power = rng.uniform(0.01, 1.0, (1, 64, 64)).astype(np.float32)
    power[:, :, :20] = -9999.0  # a third of the scene: undeclared fill
    sar = _raster(tmp_path / "s.tif", power)
    with pytest.raises(UserError, match="looks like dB"):
        check_sar_scale(open_source(sar, "SAR"), "linear")  # without the override it does look like dB
    for scale in ("linear", "auto"):
        run_prepare(out=str(tmp_path / scale), optical=[opt], sar=[sar], tile=16, sar_scale=scale,
                    nodata_sar="-9999", quicklook=False)
        meta = PreparedDataset(tmp_path / scale).meta
        assert meta["sar"]["input_scale"] == "linear" and meta["sar"]["nodata_override"] == -9999
    check_sar_scale(open_source(sar, "SAR"), "linear", nodata=parse_nodata("-9999"))
    # predict: the --nodata-sar recorded at prepare is the scene's rule, and the check follows it
    record = CheckpointMeta.from_dict({"kind": "finetune", "sar_scale": "linear",
                                       "nodata_override": {"sar": -9999}}, Path("ck"))
    plan = PredictPlan(meta=record, optical=None, sar=sar, inputs="sar")
    resolve_input_rules(plan, None, None, "auto")
    assert plan.sar_scale == "linear" and plan.input_nodata == {"sar": -9999}
    with pytest.raises(UserError, match="looks like dB"):  # told the file's nodata counts, it refuses
        resolve_input_rules(PredictPlan(meta=record, optical=None, sar=sar, inputs="sar"), None, "none", "auto")
