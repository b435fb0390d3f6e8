"""Contracts of whole-scene prediction (codemae_cli.infer.predict_scene) on tiny rasters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasters import write_raster

from codemae_cli.errors import UserError
from codemae_cli.infer import PredictStats, predict_scene
from codemae_cli.infer.cog import is_cog
from codemae_cli.infer.sources import SarSource

torch.set_num_threads(1)

OPT_STATS = {"mean": [1500.0, 1500.0, 1500.0, 2500.0], "std": [800.0, 800.0, 800.0, 1500.0]}
SAR_STATS = {"mean": [-10.0, -16.0], "std": [4.0, 4.0]}


class PixelNet(torch.nn.Module):
    """1x1 convolutions only: each pixel's logits depend on that pixel alone (position independent)."""

    def __init__(self, c_opt: int = 4, c_sar: int = 2, k: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.opt = torch.nn.Conv2d(c_opt, 8, 1)
        self.sar = torch.nn.Conv2d(c_sar, 8, 1)
        self.out = torch.nn.Conv2d(8, k, 1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
        self.calls = 0

    def forward(self, optical=None, sar=None):
        self.calls += 1
        h = 0
        if optical is not None:
            h = h + self.opt(optical)
        if sar is not None:
            h = h + self.sar(sar)
        return self.out(torch.relu(h))


def _fn(net):
    return lambda o, s: net(o, s)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from codemae_cli.data.synth import write_scene_pair

    d = tmp_path_factory.mktemp("scenes")
    same = write_scene_pair(d / "same", 150, 130, seed=3, labels=False, sar_scale="db")
    other = write_scene_pair(d / "other", 120, 100, seed=4, labels=False, sar_scale="linear", sar_crs="EPSG:4326")
    return {"same": same, "other": other}


def _read(path, band=None):
    with rasterio.open(path) as ds:
        return ds.read() if band is None else ds.read(band)


def _direct_probs(net, optical_path, stats=OPT_STATS):
    """The model on the whole scene at once (fine for a 1x1 model): the reference for blending."""
    x = _read(optical_path).astype(np.float32)
    mean = np.asarray(stats["mean"], np.float32)[:, None, None]
    std = np.asarray(stats["std"], np.float32)[:, None, None]
    t = torch.from_numpy((x - mean) / std)[None]
    with torch.no_grad():
        return torch.softmax(net(t, None), 1)[0].numpy()


def test_grid_tags_and_cog(scenes, tmp_path):
    net = PixelNet()
    out = tmp_path / "mask.tif"
    summary = predict_scene(_fn(net), scenes["same"]["optical"], None, out, window=64, overlap=16, batch_size=3,
                            stats={"optical": OPT_STATS}, inputs="optical", class_names=["a", "b", "c"],
                            class_colors=[[255, 0, 0], [0, 255, 0], "#0000ff"], tags={"codemae_model": "pixelnet"})
    with rasterio.open(scenes["same"]["optical"]) as src, rasterio.open(out) as ds:
        assert ds.crs == src.crs
        assert ds.transform == src.transform
        assert (ds.width, ds.height) == (src.width, src.height)
        assert ds.dtypes == ("uint8",) and ds.count == 1 and ds.nodata == 255
        assert ds.tags()["codemae_model"] == "pixelnet"
        assert ds.tags()["class_names"] == '["a", "b", "c"]'
        assert ds.descriptions == ("class",)
        assert ds.colormap(1)[2] == (0, 0, 255, 255)
        cls = ds.read(1)
    assert is_cog(out)
    assert set(np.unique(cls)) <= {0, 1, 2}
    assert sum(summary["pixels_per_class"].values()) + summary["nodata_pixels"] == 150 * 130
    assert summary["pixels_per_class"]["b"] == int((cls == 1).sum())
    # the class map is the arg-max of the model applied to the whole scene
    direct = _direct_probs(net, scenes["same"]["optical"])
    agree = (direct.argmax(0) == cls).mean()
    assert agree > 0.999
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]  # no temporary left behind


def test_no_seams_two_window_layouts(scenes, tmp_path):
    net = PixelNet(seed=1)
    probs = []
    for window, overlap in [(64, 16), (96, 0.4)]:
        out = tmp_path / f"m{window}.tif"
        prob = tmp_path / f"p{window}.tif"
        predict_scene(_fn(net), scenes["same"]["optical"], None, out, window=window, overlap=overlap, batch_size=4,
                      stats={"optical": OPT_STATS}, probabilities=prob, probabilities_dtype="float32")
        probs.append(_read(prob))
    assert probs[0].shape == (3, 150, 130)
    assert np.abs(probs[0] - probs[1]).max() < 1e-3
    np.testing.assert_allclose(probs[0], _direct_probs(net, scenes["same"]["optical"]), atol=1e-4)
    np.testing.assert_allclose(probs[0].sum(0), 1.0, atol=1e-4)


def test_uint8_probabilities_scaled(scenes, tmp_path):
    net = PixelNet(seed=2)
    prob = tmp_path / "p.tif"
    predict_scene(_fn(net), scenes["same"]["optical"], None, tmp_path / "m.tif", window=64, overlap=8,
                  stats={"optical": OPT_STATS}, probabilities=prob)
    with rasterio.open(prob) as ds:
        q = ds.read()
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.scales[0] == pytest.approx(1 / 254)
    ref = _direct_probs(net, scenes["same"]["optical"])
    assert np.abs(q / 254.0 - ref).max() <= 0.5 / 254 + 1e-4


def test_scene_smaller_than_window(scenes, tmp_path):
    net = PixelNet(seed=5)
    src = tmp_path / "small.tif"
    window = rasterio.windows.Window(10, 20, 37, 23)
    with rasterio.open(scenes["same"]["optical"]) as ds:
        data, transform = ds.read(window=window), ds.window_transform(window)
    write_raster(src, data, like=scenes["same"]["optical"], transform=transform, tiled=False)
    out, prob = tmp_path / "m.tif", tmp_path / "p.tif"
    stats = PredictStats()
    predict_scene(_fn(net), src, None, out, window=64, overlap=16, stats={"optical": OPT_STATS},
                  probabilities=prob, probabilities_dtype="float32", instrument=stats)
    assert stats.windows == 1
    with rasterio.open(out) as ds:
        assert (ds.height, ds.width) == (23, 37)
        assert ds.transform == transform
    np.testing.assert_allclose(_read(prob), _direct_probs(net, src), atol=1e-4)


def test_accumulator_bounded_by_a_band_of_rows(tmp_path):
    """A tall scene: the open accumulator never exceeds window + stride rows, whatever the height."""
    h, w = 700, 40
    src = tmp_path / "tall.tif"
    rng = np.random.default_rng(0)
    write_raster(src, rng.integers(1, 4000, size=(4, h, w), dtype=np.uint16), origin=(500000.0, 5700000.0))
    net = PixelNet(seed=6)
    stats = PredictStats()
    window, overlap = 48, 16
    predict_scene(_fn(net), src, None, tmp_path / "m.tif", window=window, overlap=overlap, batch_size=5,
                  stats={"optical": OPT_STATS}, instrument=stats)
    stride = window - overlap
    assert stats.band_rows == window + stride < h
    assert stats.max_open_rows <= stats.band_rows
    # segments between window-row starts: the last one a batch touches may stick out (by less than
    # a window: the last segment, below the snapped last window row, is a window tall)
    assert stats.band_rows <= stats.max_alloc_rows < stats.band_rows + window
    assert stats.max_strip_rows == window
    # each row written exactly once, in order, in bands no taller than the open band
    rows = [r for top, n in stats.flushes for r in range(top, top + n)]
    assert rows == list(range(h))
    assert max(n for _, n in stats.flushes) <= stats.band_rows
    assert stats.strips_read == len(range(0, h - window + 1, stride)) + 1  # + the snapped last row


def test_nodata_propagation_optical_and_sar(scenes, tmp_path):
    # optical with a nodata (0) block, SAR with a NaN block: both become 255 in the class map
    opt = tmp_path / "opt.tif"
    sar = tmp_path / "sar.tif"
    with rasterio.open(scenes["same"]["optical"]) as ds:
        data = ds.read()
    data[:, 10:30, 5:25] = 0
    data[2, 100:105, 100:110] = 0  # one band only: a legitimate 0, valid as in the training chips
    write_raster(opt, data, like=scenes["same"]["optical"])
    with rasterio.open(scenes["same"]["sar"]) as ds:
        sdata = ds.read()
    sdata[:, 60:70, 40:90] = np.nan
    write_raster(sar, sdata, like=scenes["same"]["sar"])
    out = tmp_path / "m.tif"
    summary = predict_scene(_fn(PixelNet()), opt, sar, out, window=64, overlap=16,
                            stats={"optical": OPT_STATS, "sar": SAR_STATS}, inputs="both")
    cls = _read(out, 1)
    expected = np.zeros(cls.shape, bool)
    expected[10:30, 5:25] = True
    expected[60:70, 40:90] = True
    assert np.array_equal(cls == 255, expected)
    assert summary["nodata_pixels"] == int(expected.sum())


def test_sar_in_another_crs_is_warped_onto_the_optical_grid(scenes, tmp_path):
    pair = scenes["other"]
    with rasterio.open(pair["sar"]) as ds:
        assert ds.crs.to_epsg() == 4326
    out = tmp_path / "m.tif"
    net = PixelNet(seed=7)
    summary = predict_scene(_fn(net), pair["optical"], pair["sar"], out, window=64, overlap=16,
                            stats={"optical": OPT_STATS, "sar": SAR_STATS}, inputs="both", sar_scale="linear")
    with rasterio.open(pair["optical"]) as src, rasterio.open(out) as ds:
        assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape
    # the SAR footprint covers the optical scene (up to its resampled edge): most pixels are valid
    assert summary["nodata_pixels"] < 0.05 * 120 * 100
    # the warped SAR (linear -> bilinear in power -> dB) agrees with GDAL's own warp of the SAR
    from codemae_cli.data.geo import Grid

    with rasterio.open(pair["optical"]) as o:
        sar_src = SarSource(pair["sar"], scale="linear", ref=Grid.of(o))
    try:
        db, valid = sar_src.read_strip(0, 120)
    finally:
        sar_src.close()
    from rasterio.vrt import WarpedVRT

    with rasterio.open(pair["sar"]) as s, rasterio.open(pair["optical"]) as o:
        with WarpedVRT(s, crs=o.crs, transform=o.transform, width=o.width, height=o.height,
                       resampling=rasterio.enums.Resampling.bilinear) as vrt:
            lin = vrt.read()
    ok = valid & np.all(np.isfinite(lin) & (lin > 0), axis=0)
    assert ok.mean() > 0.9
    ref_db = 10 * np.log10(lin[:, ok])
    assert np.median(np.abs(db[:, ok] - ref_db)) < 0.05


def test_sar_only_uses_the_sar_grid(scenes, tmp_path):
    pair = scenes["other"]
    out = tmp_path / "m.tif"
    predict_scene(lambda o, s: PixelNet()(None, s), None, pair["sar"], out, window=32, overlap=8,
                  stats={"sar": SAR_STATS}, inputs="sar", sar_scale="linear")
    with rasterio.open(pair["sar"]) as src, rasterio.open(out) as ds:
        assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape


def test_sar_scale_conversion(tmp_path):
    p = tmp_path / "lin.tif"
    lin = np.array([[[1.0, 0.1, 0.0, -1.0]]], dtype=np.float32)
    write_raster(p, lin, origin=(500000.0, 5700000.0))
    for scale, expect in (("linear", [0.0, -10.0]), ("amplitude", [0.0, -20.0]), ("db", [1.0, 0.1])):
        s = SarSource(p, scale=scale)
        db, valid = s.read_strip(0, 1)
        s.close()
        np.testing.assert_allclose(db[0, 0, :2], expect, atol=1e-5)
        if scale != "db":
            assert valid.tolist() == [[True, True, False, False]]  # power <= 0 is nodata


def test_tta_runs_all_flips_and_keeps_an_equivariant_model_exact(scenes, tmp_path):
    net = PixelNet(seed=8)
    probs = []
    for tta in (False, True):
        net.calls = 0
        prob = tmp_path / f"p{tta}.tif"
        s = predict_scene(_fn(net), scenes["same"]["optical"], None, tmp_path / f"m{tta}.tif", window=64, overlap=16,
                          batch_size=4, stats={"optical": OPT_STATS}, tta=tta, probabilities=prob,
                          probabilities_dtype="float32")
        probs.append(_read(prob))
        assert net.calls == s["batches"] * (4 if tta else 1)
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_interrupted_run_leaves_nothing(scenes, tmp_path, exc):
    net = PixelNet()

    def failing(o, s):
        if net.calls >= 2:
            raise exc("stop")
        return net(o, s)

    out = tmp_path / "m.tif"
    with pytest.raises(exc):
        predict_scene(failing, scenes["same"]["optical"], None, out, window=32, overlap=8, batch_size=2,
                      stats={"optical": OPT_STATS}, probabilities=tmp_path / "p.tif", vectorize=tmp_path / "v.gpkg")
    assert list(tmp_path.iterdir()) == []


def test_vectorize_option(scenes, tmp_path):
    import geopandas as gpd

    out, vec = tmp_path / "m.tif", tmp_path / "v.gpkg"
    s = predict_scene(_fn(PixelNet(seed=9)), scenes["same"]["optical"], None, out, window=64, overlap=16,
                      stats={"optical": OPT_STATS}, class_names=["a", "b", "c"], vectorize=vec)
    gdf = gpd.read_file(vec)
    assert gdf.crs == rasterio.open(out).crs
    assert s["vectors"]["polygons"] == len(gdf) > 0
    # polygons tile the valid pixels exactly (1 m pixels: area in m^2 == pixel count)
    for name, n in s["pixels_per_class"].items():
        assert gdf.loc[gdf.class_name == name, "area"].sum() == pytest.approx(n)


# ---- bad input ------------------------------------------------------------------------------
def _err(fn, match):
    with pytest.raises(UserError, match=match):
        fn()


def test_bad_input(scenes, tmp_path, tmp_path_factory):
    fn = _fn(PixelNet())
    opt, sar = scenes["same"]["optical"], scenes["same"]["sar"]
    st = {"optical": OPT_STATS, "sar": SAR_STATS}
    _err(lambda: predict_scene(fn, tmp_path / "nope.tif", None, tmp_path / "m.tif", stats=st), "does not exist")
    _err(lambda: predict_scene(fn, opt, None, tmp_path / "no_dir" / "m.tif", stats=st), "directory")
    _err(lambda: predict_scene(fn, opt, None, tmp_path / "m.tif", stats={"optical": {"mean": [0] * 3, "std": [1] * 3}}),
         "4 band")
    _err(lambda: predict_scene(fn, opt, None, tmp_path / "m.tif", inputs="both", stats=st), "SAR scene")
    linked = tmp_path_factory.mktemp("linked")
    old = linked / "old.tif"
    old.write_bytes(b"x")
    (linked / "link.tif").hardlink_to(old)  # one file under two names: outputs must be distinct files
    _err(lambda: predict_scene(fn, opt, None, old, probabilities=linked / "link.tif", stats=st),
         "is the same file as the output")
    _err(lambda: predict_scene(fn, opt, None, tmp_path / "m.tif", vectorize=tmp_path / "v.shp", stats=st),
         r"GeoPackage.*\.gpkg")
    assert sorted(p.name for p in linked.iterdir()) == ["link.tif", "old.tif"] and old.read_bytes() == b"x"
    _err(lambda: predict_scene(fn, opt, None, tmp_path / "m.tif", window=64, overlap=64, stats=st), "overlap")
    # a raster without CRS
    nocrs = tmp_path / "nocrs.tif"
    write_raster(nocrs, np.ones((4, 8, 8), np.uint16), crs=None)
    _err(lambda: predict_scene(fn, nocrs, None, tmp_path / "m.tif", stats=st), "no CRS")
    # SAR far away from the optical scene
    far = tmp_path / "far.tif"
    with rasterio.open(sar) as ds:
        data = ds.read()
    write_raster(far, data, like=sar, transform=from_origin(100000.0, 1000000.0, 1.0, 1.0))
    _err(lambda: predict_scene(fn, opt, far, tmp_path / "m.tif", inputs="both", stats=st), "does not overlap")
    # every input pixel nodata
    empty = tmp_path / "empty.tif"
    write_raster(empty, np.zeros((4, 8, 8), np.uint16), origin=(500000.0, 5700000.0), nodata=0)
    _err(lambda: predict_scene(fn, empty, None, tmp_path / "m.tif", window=16, overlap=4, stats=st), "nodata")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.tif", "far.tif", "nocrs.tif"]


# ---- real samples ---------------------------------------------------------------------------
def test_real_spacenet6_pair_nodata_follows_the_sar_swath(sample_pair, tmp_path):
    rgb, sar = sample_pair
    out = tmp_path / "m.tif"
    stats = {"optical": {"mean": [90.0, 90.0, 90.0], "std": [50.0, 50.0, 50.0]},
             "sar": {"mean": [-10.0] * 4, "std": [5.0] * 4}}
    s = predict_scene(lambda o, x: PixelNet(c_opt=3, c_sar=4)(o, x), rgb, sar, out, window=64, overlap=16,
                      stats=stats, inputs="both")
    swath = np.all(np.isfinite(_read(sar)), axis=0)
    cls = _read(out, 1)
    assert np.array_equal(cls == 255, ~swath)  # about 39 % of the scene lies outside the SAR swath
    assert s["nodata_pixels"] == int((~swath).sum()) > 0
    with rasterio.open(rgb) as a, rasterio.open(out) as b:
        assert a.crs == b.crs and a.transform == b.transform


def test_real_rotated_slc_is_warped_as_intensity(real_dir, sample_pair, tmp_path):
    rgb, _ = sample_pair
    slc = real_dir / "spacenet6_rotterdam" / "sar_hh.tif"
    with rasterio.open(slc) as ds:
        assert ds.dtypes[0] == "complex64" and ds.transform.b != 0  # rotated geotransform
    out = tmp_path / "m.tif"
    stats = {"optical": {"mean": [90.0] * 3, "std": [50.0] * 3}, "sar": {"mean": [-10.0], "std": [5.0]}}
    s = predict_scene(lambda o, x: PixelNet(c_opt=3, c_sar=1)(o, x), rgb, slc, out, window=64, overlap=16,
                      stats=stats, inputs="both")
    # the SLC footprint lies inside the optical scene: part of it is valid, the rest nodata
    assert 0 < s["nodata_pixels"] < 200 * 200
    from codemae_cli.data.geo import Grid
    from codemae_cli.infer.sources import SarSource

    with rasterio.open(rgb) as o:
        src = SarSource(slc, ref=Grid.of(o))
        ref_grid = Grid.of(o)
    try:  # strips of 64 rows: the warp of each strip reads only the SLC pixels under it
        parts = [src.read_strip(r, min(64, 200 - r)) for r in range(0, 200, 64)]
    finally:
        src.close()
    db = np.concatenate([p[0] for p in parts], axis=1)
    valid = np.concatenate([p[1] for p in parts], axis=0)
    # reference: intensity |z|^2 of the whole SLC (rotated grid) warped in one go by GDAL with the
    # kernel prepare uses (2.5 m SAR pixels onto a 4.5 m grid: average)
    from rasterio.warp import reproject

    with rasterio.open(slc) as ds:
        power = (np.abs(ds.read()) ** 2).astype(np.float32)
        power[power <= 0] = np.nan
        lin = np.full((1, 200, 200), np.nan, np.float32)
        reproject(power, lin, src_transform=ds.transform, src_crs=ds.crs, src_nodata=np.nan,
                  dst_transform=ref_grid.transform, dst_crs=ref_grid.crs, dst_nodata=np.nan,
                  resampling=rasterio.enums.Resampling.average)
    assert src.kernel == "average"
    assert np.array_equal(valid, np.isfinite(lin[0]))
    np.testing.assert_allclose(db[:, valid], 10 * np.log10(lin[:, valid]), atol=0.01)
    assert np.array_equal(_read(out, 1) == 255, ~valid)


@pytest.mark.parametrize("pair_name,inputs", [("same", "optical"), ("same", "both"), ("other", "both")])
def test_panels_match_one_whole_width_pass(scenes, tmp_path, pair_name, inputs):
    """Vertical panels narrower than the scene: same probabilities and classes as one panel, and an
    accumulator never wider than a panel's window span (windows straddling borders run twice)."""
    pair = scenes[pair_name]
    sar = pair["sar"] if inputs == "both" else None
    st_kw = {"optical": OPT_STATS, "sar": SAR_STATS}
    window, overlap, pw = 32, 8, 30  # one window column per panel (plus the straddling ones)
    res = {}
    for name, panel_width in (("one", None), ("panels", pw)):
        out, prob = tmp_path / f"{name}.tif", tmp_path / f"{name}_p.tif"
        stats = PredictStats()
        summary = predict_scene(_fn(PixelNet(seed=11)), pair["optical"], sar, out, window=window, overlap=overlap,
                                batch_size=3, stats=st_kw, inputs=inputs, sar_scale="db" if pair_name == "same"
                                else "linear", probabilities=prob, probabilities_dtype="float32",
                                panel_width=panel_width, instrument=stats)
        res[name] = (_read(out, 1), _read(prob), summary, stats)
    cls1, p1, s1, st1 = res["one"]
    cls2, p2, s2, st2 = res["panels"]
    h, w = cls1.shape
    assert len(st1.panels) == 1 and st1.acc_cols == w
    assert len(st2.panels) >= 3
    # panels tile the columns once each, in order; every row of each panel written once, in order
    assert [x0 for x0, *_ in st2.panels] == [0] + [x1 for _, x1, *_ in st2.panels[:-1]]
    assert st2.panels[-1][1] == w
    assert st2.flushes and [r for top, n in st2.flushes for r in range(top, top + n)] == list(range(h)) * len(st2.panels)
    # memory: the open accumulator is band_rows x the widest panel span, far narrower than the scene
    spans = [p1_ - p0 for _, _, p0, p1_ in st2.panels]
    assert st2.acc_cols == max(spans) < w
    assert all(s <= (x1 - x0) + 2 * window for (x0, x1, _, _), s in zip(st2.panels, spans, strict=True))
    assert st2.acc_cols <= max(pw, window - overlap) + window
    assert st2.max_open_cols <= st2.acc_cols and st2.max_strip_cols <= st2.acc_cols
    assert st2.max_open_rows <= st2.band_rows == st1.band_rows
    assert st2.windows == st1.windows < st2.windows_run  # border windows run in both panels
    assert np.array_equal(np.isnan(p1), np.isnan(p2))
    assert s2["nodata_pixels"] == s1["nodata_pixels"]
    if pair_name == "other":
        # SAR in another CRS: GDAL's approximate transformer (error <= 1/8 source pixel) depends on
        # the warped block's extent, so a panel's SAR input differs slightly from a whole-width
        # strip's (as strips of rows already differ from a whole-scene warp)
        np.testing.assert_allclose(p2, p1, atol=5e-3, equal_nan=True)
        assert (cls1 == cls2).mean() > 0.995
        return
    # exactness: same inputs and the same weighted sums per pixel, so the same probabilities and classes
    np.testing.assert_allclose(p2, p1, atol=1e-5, equal_nan=True)
    assert np.array_equal(cls1, cls2)
    assert s2["pixels_per_class"] == s1["pixels_per_class"]


def test_panel_reads_and_writes_match_full_width(scenes, tmp_path):
    """Column windows of the sources (aligned and warped SAR) and of the writer equal full-width ones."""
    from codemae_cli.data.geo import Grid
    from codemae_cli.infer.cog import TiledWriter
    from codemae_cli.infer.sources import OpticalSource

    pair = scenes["other"]
    with rasterio.open(pair["optical"]) as o:
        ref = Grid.of(o)
    for src in (OpticalSource(pair["optical"]), SarSource(pair["sar"], scale="linear", ref=ref)):
        try:
            full, ok = src.read_strip(10, 40)
            part, ok_part = src.read_strip(10, 40, 23, 71)
        finally:
            src.close()
        # warped SAR too: warps run in fixed column blocks of the grid, whatever the window
        np.testing.assert_allclose(part, full[:, :, 23:71], atol=1e-4, equal_nan=True)
        assert np.array_equal(ok_part, ok[:, 23:71])
    data = np.arange(ref.height * ref.width, dtype=np.int64).reshape(ref.height, ref.width) % 251
    w = TiledWriter(tmp_path / "w.tif", ref, 1, "uint8", 255)
    for x0, x1 in ((60, ref.width), (0, 60)):  # panels in any order
        for r in range(0, ref.height, 33):
            w.write_rows(r, data[r : r + 33, x0:x1].astype(np.uint8), col=x0)
    w.close()
    assert np.array_equal(_read(tmp_path / "w.tif", 1), data)


# ---- the optimised path against a plain reference on the demo scene -------------------------
@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A tiny CoDe-MAE segmentation model, random weights from a fixed seed, saved and loaded back."""
    from safetensors.torch import load_file, save_file

    from codemae_cli.tasks import build_task_model
    from codemae_cli.tasks.config import EncoderSection, FinetuneRecipe, TaskConfig

    def build():
        recipe = FinetuneRecipe(model=EncoderSection(preset="tiny", img_size=64, drop_path=0.0),
                                task=TaskConfig(kind="segmentation", inputs="both", head="linear", from_scratch=True))
        model, _ = build_task_model(recipe, optical_bands=3, sar_bands=4, num_classes=4)
        return model.eval()

    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("demo_model") / "model.safetensors"
    save_file(build().state_dict(), str(path))
    model = build()
    model.load_state_dict(load_file(str(path)))
    return model


def _reference_class_map(model, rgb, sar, stats, window, overlap):
    """The straightforward algorithm on the whole (small) scene in memory: every window of the grid
    through the model one by one, probabilities times the separable taper summed into scene-sized
    arrays, divided by the summed weights, arg-max, nodata where any input band is invalid.
    Returns the class map and the margin between the two most probable classes."""
    from codemae_cli.infer.sources import OpticalSource
    from codemae_cli.infer.windows import WindowGrid

    o = OpticalSource(rgb)
    s = SarSource(sar, ref=o.grid)
    try:
        opt, ok_o = o.read_strip(0, o.grid.height)
        sar_db, ok_s = s.read_strip(0, o.grid.height)
        grid = o.grid
    finally:
        o.close()
        s.close()
    valid = ok_o & ok_s
    x = {}
    for m, data in (("optical", opt), ("sar", sar_db)):
        mean = np.asarray(stats[m]["mean"], np.float32)[:, None, None]
        std = np.asarray(stats[m]["std"], np.float32)[:, None, None]
        x[m] = torch.from_numpy(np.where(valid, (data - mean) / std, 0.0).astype(np.float32))
    lay = WindowGrid(grid.height, grid.width, window, overlap)
    acc = torch.zeros(4, grid.height, grid.width, dtype=torch.float64)
    wsum = torch.zeros(grid.height, grid.width, dtype=torch.float64)
    for r in lay.row_starts:
        for c in lay.col_starts:
            cut = {m: t[None, :, r : r + window, c : c + window] for m, t in x.items()}
            with torch.no_grad():
                p = torch.softmax(model(optical=cut["optical"], sar=cut["sar"]).float(), 1)[0].double()
            w = torch.from_numpy(np.outer(lay.weight_1d(r, grid.height), lay.weight_1d(c, grid.width))).double()
            acc[:, r : r + window, c : c + window] += p * w
            wsum[r : r + window, c : c + window] += w
    probs = (acc / wsum).numpy()
    cls = probs.argmax(0).astype(np.uint8)
    top2 = np.sort(probs, axis=0)[-2:]
    cls[~valid] = 255
    return cls, top2[1] - top2[0]


@pytest.mark.parametrize("panel_width", [None, 48])
def test_demo_scene_class_map_equals_the_plain_reference(sample_pair, demo_model, tmp_path, panel_width):
    rgb, sar = sample_pair
    stats = {"optical": {"mean": [90.0] * 3, "std": [50.0] * 3}, "sar": {"mean": [-10.0] * 4, "std": [5.0] * 4}}
    window, overlap = 64, 16
    out = tmp_path / "m.tif"
    predict_scene(lambda o, s: demo_model(optical=o, sar=s), rgb, sar, out, window=window, overlap=overlap,
                  batch_size=3, stats=stats, inputs="both", panel_width=panel_width)
    got = _read(out, 1)
    ref, margin = _reference_class_map(demo_model, rgb, sar, stats, window, overlap)
    assert np.array_equal(got == 255, ref == 255)
    assert len(np.unique(ref[ref != 255])) >= 2  # the random model does not map everything to one class
    # float32 batched blending against a float64 per-window reference: classes are identical wherever
    # the two best classes are not a near tie (which leaves nearly every pixel to check)
    clear = (margin > 1e-4) & (ref != 255)
    assert clear.sum() > 0.99 * (ref != 255).sum()
    assert np.array_equal(got[clear], ref[clear])


def test_class_map_is_argmax_with_ties_to_the_lower_class():
    from codemae_cli.infer.writer import class_map

    g = torch.Generator().manual_seed(0)
    p = torch.rand(5, 37, 41, generator=g)
    p[3, :5] = p[1, :5]  # exact ties: the lower class id wins, as with argmax
    p[:, 10:12] = 0.2  # all classes tied
    cls = class_map(p)
    assert cls.dtype == torch.uint8
    assert torch.equal(cls.long(), p.argmax(0))
    assert (cls[10:12] == 0).all()


@pytest.mark.parametrize("where", ["write", "read"])
def test_a_failing_writer_or_reader_thread_stops_the_run_and_leaves_nothing(scenes, tmp_path, monkeypatch, where):
    """Errors raised in the writer or reader threads reach the caller; no output or temporary remains."""
    from codemae_cli.infer import cog, sources

    class DiskFull(OSError):
        pass

    if where == "write":
        def write_rows(self, row, data, col=0):
            raise DiskFull("no space left on device")

        monkeypatch.setattr(cog.TiledWriter, "write_rows", write_rows)
    else:
        real = sources.OpticalSource.read_strip

        def read_strip(self, row, *args, **kwargs):
            if row > 0:
                raise DiskFull("input/output error")
            return real(self, row, *args, **kwargs)

        monkeypatch.setattr(sources.OpticalSource, "read_strip", read_strip)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DiskFull):
        predict_scene(_fn(PixelNet()), scenes["same"]["optical"], None, out / "m.tif", window=32, overlap=8,
                      batch_size=2, stats={"optical": OPT_STATS}, probabilities=out / "p.tif")
    assert list(out.iterdir()) == []


def _codemae_threads() -> list[str]:
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name.startswith("codemae-") and t.is_alive())


def test_errors_in_the_pipeline_stages_surface_once_and_leave_nothing(scenes, tmp_path):
    """An error raised in the blend stage (a class count that disagrees) or in the model's thread
    half-way through the scene is the error the caller gets; no output, temporary file or thread
    of the pipeline is left behind."""
    opt = scenes["same"]["optical"]
    st = {"optical": OPT_STATS}
    before = _codemae_threads()
    _err(lambda: predict_scene(_fn(PixelNet(k=3)), opt, None, tmp_path / "m.tif", window=32, overlap=8,
                               batch_size=2, stats=st, class_names=["a", "b"]), "predicts 3 classes but 2")
    net, calls = PixelNet(k=3), []

    def failing(o, s):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory half-way")
        return net(o, s)

    with pytest.raises(RuntimeError, match="half-way"):
        predict_scene(failing, opt, None, tmp_path / "m.tif", window=32, overlap=8, batch_size=2, stats=st,
                      probabilities=tmp_path / "p.tif")
    assert list(tmp_path.iterdir()) == []
    assert _codemae_threads() == before


def test_the_model_thread_runs_only_the_model(scenes, tmp_path, monkeypatch):
    """Softmax, blending and writing run beside the model: the thread that calls the model does
    nothing else between its calls but hand the answers on (checked by where the softmax runs)."""
    import threading

    import codemae_cli.infer.predict as P

    seen = []
    real = P.probs_from_logits

    def spy(outs, window):
        seen.append(threading.current_thread().name)
        return real(outs, window)

    monkeypatch.setattr(P, "probs_from_logits", spy)
    predict_scene(_fn(PixelNet()), scenes["same"]["optical"], None, tmp_path / "m.tif", window=32, overlap=8,
                  batch_size=4, stats={"optical": OPT_STATS})
    assert seen and all(name.startswith("codemae-blend") for name in seen)


def test_ctrl_c_mid_scene_stops_every_stage_and_leaves_nothing(scenes, tmp_path):
    """Ctrl-C while the pipeline is full (reader, blend and writer stages all busy): the process
    ends promptly (no stage thread left waiting), with nothing at the output paths."""
    import signal
    import subprocess
    import sys
    import textwrap

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_predict import PixelNet, OPT_STATS
        from codemae_cli.infer.predict import predict_scene
        net = PixelNet()
        calls = []
        def slow(o, s):
            calls.append(1)
            if len(calls) == 3:
                print("running", flush=True)
            time.sleep(0.05)
            return net(o, s)
        try:
            predict_scene(slow, {str(scenes["same"]["optical"])!r}, None, {str(out_dir / "m.tif")!r}, window=16,
                          overlap=4, batch_size=1, stats={{"optical": OPT_STATS}},
                          probabilities={str(out_dir / "p.tif")!r})
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert rc == 130, proc.stderr.read()
    assert list(out_dir.iterdir()) == []
