"""Co-registration: a known bright feature lands on the same reference pixel (within half a
pixel) when the SAR comes in another CRS and resolution; grids, overlap and resampling choice."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform
from rasters import write_raster

from codemae_cli.data.coregister import reference_grid
from codemae_cli.data.geo import Grid, resampling_kernel, same_grid_offset
from codemae_cli.data.prepare import run_prepare
from codemae_cli.data.raster import open_source
from codemae_cli.data.shards import PreparedDataset

OPT_LEFT, OPT_TOP, OPT_RES, OPT_N = 600000.0, 5750000.0, 1.0, 160
FEATURE = (600071.3, 5749917.6)  # ground position of the bright target, EPSG:32631


def _pair(tmp_path, sar_crs, sar_res):
    rng = np.random.default_rng(0)
    opt = rng.integers(100, 200, (3, OPT_N, OPT_N)).astype(np.uint16)
    write_raster(tmp_path / "opt.tif", opt, "EPSG:32631", transform=from_origin(OPT_LEFT, OPT_TOP, OPT_RES, OPT_RES),
                 nodata=0)
    # SAR grid in another CRS covering the optical footprint with a margin.
    xs, ys = warp_transform("EPSG:32631", sar_crs, [OPT_LEFT - 20, OPT_LEFT + OPT_N + 20],
                            [OPT_TOP + 20, OPT_TOP - OPT_N - 20])
    left, top = min(xs), max(ys)
    w = int((max(xs) - left) / sar_res) + 1
    h = int((top - min(ys)) / sar_res) + 1
    sar = np.full((1, h, w), 0.01, dtype=np.float32)  # linear power background
    fx, fy = warp_transform("EPSG:32631", sar_crs, [FEATURE[0]], [FEATURE[1]])
    col, row = (fx[0] - left) / sar_res, (top - fy[0]) / sar_res
    # A 3x3 block of bright SAR pixels centred on the pixel containing the target; the target is
    # then the centre of that pixel (exactly representable in the SAR grid).
    ci, ri = int(col), int(row)
    sar[0, ri - 1: ri + 2, ci - 1: ci + 2] = 100.0
    centre = (left + (ci + 0.5) * sar_res, top - (ri + 0.5) * sar_res)
    write_raster(tmp_path / "sar.tif", sar, sar_crs, transform=from_origin(left, top, sar_res, sar_res))
    gx, gy = warp_transform(sar_crs, "EPSG:32631", [centre[0]], [centre[1]])
    return tmp_path / "opt.tif", tmp_path / "sar.tif", (gx[0], gy[0])


def _feature_position(ds, transform_fn):
    """Power-weighted centroid of the bright excess, in reference-grid pixel coordinates."""
    best = None
    for i in range(len(ds)):
        item = ds.read(i)
        power = 10 ** (item["sar"][0].astype(np.float64) / 10)
        if best is None or np.nanmax(power) > best[0]:
            best = (np.nanmax(power), i, power)
    _, i, power = best
    row0, col0 = int(ds.index.iloc[i]["row"]), int(ds.index.iloc[i]["col"])
    excess = np.nan_to_num(np.clip(power - 0.01, 0, None))
    rr, cc = np.mgrid[0: power.shape[0], 0: power.shape[1]] + 0.5
    return row0 + (excess * rr).sum() / excess.sum(), col0 + (excess * cc).sum() / excess.sum()


@pytest.mark.parametrize("sar_crs,sar_res,resampling", [
    ("EPSG:32632", 1.7, "bilinear"),  # coarser SAR in the neighbouring UTM zone
    ("EPSG:3857", 2.3, "bilinear"),  # web mercator (about 1.4 m on the ground here)
    ("EPSG:32632", 0.6, "average"),  # finer SAR: integrated, not aliased
])
def test_bright_feature_lands_within_half_a_pixel(tmp_path, sar_crs, sar_res, resampling):
    opt, sar, (gx, gy) = _pair(tmp_path, sar_crs, sar_res)
    run_prepare(out=str(tmp_path / "out"), optical=[str(opt)], sar=[str(sar)], tile=64, min_valid=0.5,
                sar_scale="linear", quicklook=False)
    ds = PreparedDataset(tmp_path / "out")
    assert ds.meta["scenes"][0]["resampling"]["sar"] == [resampling]
    row, col = _feature_position(ds, None)
    exp_col, exp_row = (gx - OPT_LEFT) / OPT_RES, (OPT_TOP - gy) / OPT_RES
    assert abs(row - exp_row) < 0.5 and abs(col - exp_col) < 0.5, (row, col, exp_row, exp_col)
    # Optical on the reference grid is read untouched.
    with rasterio.open(opt) as src:
        item = ds.read(0)
        r, c = int(ds.index.iloc[0]["row"]), int(ds.index.iloc[0]["col"])
        direct = src.read(window=((r, r + 64), (c, c + 64))).astype(np.float32)
    np.testing.assert_array_equal(item["optical"], direct)


def test_feature_with_reprojected_reference_grid(tmp_path):
    """--crs/--res: both modalities warped; the target still lands where it belongs."""
    opt, sar, (gx, gy) = _pair(tmp_path, "EPSG:32632", 1.5)
    run_prepare(out=str(tmp_path / "out"), optical=[str(opt)], sar=[str(sar)], tile=32, crs="EPSG:32632",
                res=2.0, sar_scale="linear", quicklook=False)
    ds = PreparedDataset(tmp_path / "out")
    g = Grid(ds.meta["crs"], (2.0, 0, 0, 0, -2.0, 0), 1, 1)
    assert g.crs.to_epsg() == 32632 and ds.meta["res"] == [2.0, 2.0]
    row, col = _feature_position(ds, None)
    # Expected position: the target's SAR-CRS coordinates on the new grid.
    tf = rasterio.Affine(*[float(v) for v in ds.meta["scenes"][0]["grid_transform"]])
    fx, fy = warp_transform("EPSG:32631", "EPSG:32632", [gx], [gy])
    exp_col, exp_row = ~tf @ (fx[0], fy[0])
    assert abs(row - exp_row) < 0.5 and abs(col - exp_col) < 0.5, (row, col, exp_row, exp_col)


def test_reference_grid_and_same_grid_detection(tmp_path, sample_pair):
    rgb, sar = (open_source(p, "x") for p in sample_pair)
    g = reference_grid([rgb])
    assert (g.width, g.height) == (200, 200)
    # The SpaceNet 6 pair differs by ~0.01 px over the scene: treated as the same grid.
    assert same_grid_offset(sar.grid, g) == (0, 0)
    assert resampling_kernel(sar.grid, g, "sar") == "none"
    g2 = reference_grid([rgb], res=9.0)
    assert g2.res == (9.0, 9.0) and same_grid_offset(sar.grid, g2) is None
    assert resampling_kernel(sar.grid, g2, "sar") == "average"
    assert resampling_kernel(sar.grid, g2, "label") == "nearest"
