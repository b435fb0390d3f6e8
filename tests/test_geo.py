"""The one geospatial module: the SAR a model sees at prediction is the SAR it was trained on.

A scene is prepared, then predicted: at every pixel of every prepared chip, the SAR the
predict reader returns (and the model receives) equals the chip's SAR, with the same nodata,
for SAR on the optical grid, finer and coarser SAR in another CRS (lon/lat), and the shipped SpaceNet 6
pair (pixel sizes differing by ~0.01 px over the scene, so "the same grid" for both).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform
from rasters import write_raster

from codemae_cli.data import geo
from codemae_cli.data.geo import (
    Grid,
    rasterize_shapes,
    read_on_grid,
    resampling_kernel,
    same_grid_offset,
    sar_to_power,
    warp_scale,
)
from codemae_cli.data.prepare import run_prepare
from codemae_cli.data.shards import PreparedDataset
from codemae_cli.infer.sources import OpticalSource, SarSource

LEFT, TOP, N = 600000.0, 5750000.0, 64  # optical: 64 x 64 px of 1 m in EPSG:32631
TILE = 16


def _sar_scene(tmp_path, case: str):
    """(optical path, SAR path, SAR scale, expected kernel) for one co-registration case."""
    rng = np.random.default_rng(1)
    opt = rng.integers(50, 200, (3, N, N)).astype(np.uint16)
    opt[:, 40:44, 3:9] = 0  # nodata
    opt[1, 50:53, 30:36] = 0  # one band only: a legitimate 0
    optical = write_raster(tmp_path / "opt.tif", opt, crs="EPSG:32631", nodata=0, origin=(LEFT, TOP))
    if case == "on_grid":  # dB on the optical grid, with a nodata hole
        sar = (rng.normal(-12, 3, (1, N, N))).astype(np.float32)
        sar[0, 20:24, 30:41] = -9999.0
        return optical, write_raster(tmp_path / "sar.tif", sar, crs="EPSG:32631", nodata=-9999.0,
                                     origin=(LEFT, TOP)), "db", "none"
    res = {"finer": 0.6, "coarser": 1.7}[case]  # metres on the ground; the SAR grid is in degrees
    xs, ys = warp_transform("EPSG:32631", "EPSG:4326", [LEFT - 10, LEFT + N + 10], [TOP + 10, TOP - N - 10])
    left, top = min(xs), max(ys)
    rx, ry = res / (111320.0 * np.cos(np.radians(top))), res / 110950.0
    w, h = int((max(xs) - left) / rx) + 1, int((top - min(ys)) / ry) + 1
    power = rng.gamma(1.0, 0.05, (1, h, w)).astype(np.float32)  # speckle in linear power
    power[0, h // 3: h // 3 + 7, w // 2: w // 2 + 9] = 0.0  # <= 0: nodata
    write_raster(tmp_path / "sar.tif", power, "EPSG:4326", transform=rasterio.Affine(rx, 0, left, 0, -ry, top))
    return optical, str(tmp_path / "sar.tif"), "linear", {"finer": "average", "coarser": "bilinear"}[case]


def _prepared(tmp_path, optical, sar, scale):
    run_prepare(out=str(tmp_path / "out"), optical=[str(optical)], sar=[str(sar)], tile=TILE, min_valid=0.0,
                sar_scale=scale, quicklook=False)
    return PreparedDataset(tmp_path / "out")


def _assert_chips_equal(ds: PreparedDataset, on_grid: np.ndarray, modality: str = "sar", where=None) -> None:
    """Every chip of ``modality`` equals ``on_grid`` (C, H, W, NaN nodata) at its pixels
    (only at the pixels ``where`` is True, when given)."""
    assert len(ds) >= 4
    for i in range(len(ds)):
        r, c = int(ds.index.iloc[i]["row"]), int(ds.index.iloc[i]["col"])
        chip = ds.read(i)[modality]
        seen = on_grid[:, r: r + TILE, c: c + TILE]
        if where is not None:
            keep = where[r: r + TILE, c: c + TILE]
            chip, seen = chip[:, keep], seen[:, keep]
        assert np.array_equal(np.isnan(chip), np.isnan(seen)), f"nodata differs in chip {i}"
        np.testing.assert_allclose(seen, chip, atol=2.0**-9 + 1e-5, equal_nan=True)  # chips hold 1/256 dB steps


@pytest.mark.parametrize("case", ["on_grid", "finer", "coarser"])
def test_predict_reader_returns_the_training_chips_sar(tmp_path, monkeypatch, case):
    monkeypatch.setattr(geo, "WARP_BLOCK", 24)  # several warp blocks across this small scene
    optical, sar, scale, kernel = _sar_scene(tmp_path, case)
    ds = _prepared(tmp_path, optical, sar, scale)
    assert ds.meta["scenes"][0]["resampling"]["sar"] == [kernel]
    with rasterio.open(optical) as o:
        grid = Grid.of(o)
    src = SarSource(sar, scale=scale, ref=grid)
    try:
        assert src.kernel == kernel
        # strips and panels as predict reads them, at offsets unrelated to the chips or blocks
        rows = [src.read_strip(r, min(23, N - r), 5, N)[0] for r in range(0, N, 23)]
        left = src.read_strip(0, N, 0, 5)[0]
    finally:
        src.close()
    seen = np.concatenate([left, np.concatenate(rows, axis=1)], axis=2)
    if case != "on_grid":
        assert np.isnan(seen).any() and not np.isnan(seen).all()  # the hole and the rim are there
    _assert_chips_equal(ds, seen)


@pytest.mark.parametrize("case", ["on_grid", "coarser"])
def test_model_input_at_predict_is_the_training_sar(tmp_path, case):
    """Through ``predict_scene``: the SAR tensor handed to the model, de-normalised."""
    torch = pytest.importorskip("torch")
    from codemae_cli.infer.predict import predict_scene

    optical, sar, scale, _ = _sar_scene(tmp_path, case)
    ds = _prepared(tmp_path, optical, sar, scale)
    seen = []

    def model(o, s):
        seen.append(s.detach().float().numpy().copy())
        return torch.zeros(s.shape[0], 2, s.shape[2], s.shape[3])

    mean = 100.0  # nodata reaches the model as 0 (the mean): distinguishable from any valid dB - 100
    stats = {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}, "sar": {"mean": [mean], "std": [1.0]}}
    predict_scene(model, optical, sar, tmp_path / "m.tif", window=N, overlap=0, stats=stats, inputs="both",
                  sar_scale=scale, num_classes=2)
    x = seen[0][0]  # one window covers the scene
    db = np.where(x == 0.0, np.nan, x + mean)
    # where the optical is nodata, predict hides the SAR too (bi-modal pixels are valid jointly)
    src = OpticalSource(optical)
    try:
        optical_valid = src.read_strip(0, N)[1]
    finally:
        src.close()
    _assert_chips_equal(ds, db, where=optical_valid)


def test_predict_reads_the_training_optical(tmp_path):
    """Optical nodata follows prepare's rule at predict: all bands at nodata (a 0 in one band is valid)."""
    optical, sar, scale, _ = _sar_scene(tmp_path, "on_grid")
    ds = _prepared(tmp_path, optical, sar, scale)
    src = OpticalSource(optical)
    try:
        seen, valid = src.read_strip(0, N)
    finally:
        src.close()
    assert not valid[40:44, 3:9].any() and valid[50:53, 30:36].all()
    _assert_chips_equal(ds, seen, "optical")


def test_shipped_sample_is_on_one_grid_for_prepare_and_predict(sample_pair, tmp_path):
    """The SpaceNet 6 pair: pixel sizes differ by ~0.01 px over the scene; both read it raw."""
    rgb, sar = sample_pair
    with rasterio.open(rgb) as o, rasterio.open(sar) as s:
        grid, own = Grid.of(o), Grid.of(s)
        assert own != grid and same_grid_offset(own, grid) == (0, 0)
        raw = s.read().astype(np.float32)
        nodata = s.nodata
    ds = _prepared(tmp_path, rgb, sar, "db")
    assert ds.meta["scenes"][0]["resampling"]["sar"] == ["none"]
    src = SarSource(sar, scale="db", ref=grid)
    try:
        assert src.kernel == "none"
        seen, _ = src.read_strip(0, grid.height)
    finally:
        src.close()
    ok = np.isfinite(seen)
    if nodata is not None:
        assert not (raw[ok] == nodata).any()
    np.testing.assert_allclose(seen[ok], raw[ok], atol=1e-4)  # dB read raw (round trip through power)
    _assert_chips_equal(ds, seen)


def test_grid_is_picklable_and_windows_come_from_rasterio():
    g = Grid("EPSG:32631", (2.0, 0.0, 500000.0, 0.0, -2.0, 5700000.0), 300, 200)
    h = pickle.loads(pickle.dumps(g))
    assert h == g and h.crs.to_epsg() == 32631 and hash(h) == hash(g)
    assert g.window_bounds(10, 20, 5, 6) == (500040.0, 5699970.0, 500052.0, 5699980.0)
    assert g.window_transform(10, 20) * (0, 0) == (500040.0, 5699980.0)
    assert g.res == (2.0, 2.0) and g.bounds == (500000.0, 5699600.0, 500600.0, 5700000.0)


def test_sar_scale_rules():
    v = np.array([[[4.0, 0.0, -2.0, np.nan, 7.0]]], np.float32)
    np.testing.assert_allclose(sar_to_power(v, "linear", 7.0)[0, 0], [4.0, np.nan, np.nan, np.nan, np.nan])
    # a negative amplitude is nodata, not the positive power its square would be
    np.testing.assert_allclose(sar_to_power(v, "amplitude", None)[0, 0], [16.0, np.nan, np.nan, np.nan, 49.0])
    np.testing.assert_allclose(sar_to_power(v, "db", None)[0, 0], 10 ** (np.array([4, 0, -2, np.nan, 7]) / 10),
                               rtol=1e-6)
    z = np.array([[[3 + 4j, 0j]]], np.complex64)
    np.testing.assert_allclose(sar_to_power(z, "db", None)[0, 0], [25.0, np.nan])  # SLC: |z|^2 whatever the scale


def test_resampling_policy():
    """Average below 1/1.5 grid pixel per source pixel, bilinear above, nearest for labels."""
    grid = Grid("EPSG:32631", from_origin(LEFT, TOP, 1.0, 1.0), 100, 40)
    for res, kernel in ((0.6, "average"), (0.7, "bilinear"), (1.7, "bilinear")):
        src = Grid("EPSG:32631", from_origin(LEFT + 0.3, TOP - 0.2, res, res), 10, 10)
        assert resampling_kernel(src, grid, "sar") == kernel
        assert resampling_kernel(src, grid, "label") == "nearest"
        assert warp_scale(src, grid) == pytest.approx(res)
    shifted = Grid("EPSG:32631", from_origin(LEFT - 3.0, TOP + 2.0, 1.0, 1.0), 10, 10)
    assert same_grid_offset(shifted, grid) == (2, 3) and resampling_kernel(shifted, grid, "sar") == "none"


@pytest.mark.parametrize("kernel", ["average", "bilinear"])
def test_a_warped_pixel_does_not_depend_on_the_window(tmp_path, monkeypatch, kernel):
    """Lon/lat SAR onto a UTM grid: any window's pixels equal the whole grid's, to the bit."""
    monkeypatch.setattr(geo, "WARP_BLOCK", 24)
    optical, sar, _, _ = _sar_scene(tmp_path, "finer")
    with rasterio.open(optical) as o:
        grid = Grid.of(o)
    with rasterio.open(sar) as s:
        whole = read_on_grid(s, grid, 0, 0, N, N, kernel=kernel, prepare=lambda b: b.astype(np.float32))
        part = read_on_grid(s, grid, 7, 19, 21, 37, kernel=kernel, prepare=lambda b: b.astype(np.float32))
    assert np.isfinite(whole).mean() > 0.9
    np.testing.assert_array_equal(part, whole[:, 7:28, 19:56])


def test_one_rasteriser_for_prepare_and_evaluate():
    from shapely.geometry import box

    g = Grid("EPSG:32631", from_origin(0.0, 10.0, 1.0, 1.0), 10, 10)
    shapes = [(box(2, 2, 6, 6), 1), (box(4, 4, 8, 8), 2)]
    full = rasterize_shapes(shapes, g, fill=0)
    assert full[5, 5] == 2 and full[7, 3] == 1 and full[0, 0] == 0  # later shapes win, pixel centres
    np.testing.assert_array_equal(rasterize_shapes(shapes, g, 3, 2, 4, 5, fill=0), full[3:7, 2:7])
    assert rasterize_shapes([], g, fill=255, dtype=np.int32).dtype == np.int32


def test_rgb_band_indices_from_band_names():
    from codemae_cli.data.raster import rgb_band_indices

    assert rgb_band_indices(["blue", "green", "red", "nir"]) == (2, 1, 0)
    assert rgb_band_indices(["B1", "B02", "B03", "B04", "B8"]) == (3, 2, 1)
    assert rgb_band_indices(["R", "G", "B"]) == (0, 1, 2)
    assert rgb_band_indices(["B1", "B2", "B3"]) is None  # B2 is blue, but no red or green
    assert rgb_band_indices(["VV", "VH"]) is None
