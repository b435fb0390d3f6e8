"""The testbed's documented physics, its prepared-dataset output, and the model-free analysis path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from codemae_cli.analysis import metrics as M
from codemae_cli.analysis.testbed import CLASSES, render_testbed_scene, write_testbed


@pytest.fixture(scope="module")
def scene():
    return render_testbed_scene(128, 128, seed=7, buildings=6)


def test_scene_is_deterministic_and_well_formed(scene):
    again = render_testbed_scene(128, 128, seed=7, buildings=6)
    np.testing.assert_array_equal(scene.optical, again.optical)
    np.testing.assert_array_equal(scene.sar, again.sar)
    assert scene.optical.shape == (4, 128, 128) and scene.sar.shape == (2, 128, 128)
    assert scene.optical.dtype == np.float32 and scene.sar.dtype == np.float32
    assert 0.0 <= scene.optical.min() and scene.optical.max() <= 1.0
    assert scene.sar.min() >= -35.0 and np.isfinite(scene.sar).all()
    assert set(np.unique(scene.labels)) <= set(CLASSES)
    assert not np.array_equal(render_testbed_scene(128, 128, seed=8).labels, scene.labels)


def test_labels_are_the_ground_layers_and_effects_sit_where_the_physics_puts_them(scene):
    """Labels: buildings over roads over water over parcels; buildings stand on dry land off roads;
    the double bounce is on a footprint's wall, the sun shadow off every footprint."""
    lay = scene.layers
    np.testing.assert_array_equal(scene.labels == 2, lay["building"])
    np.testing.assert_array_equal(scene.labels == 4, lay["road"])
    np.testing.assert_array_equal(scene.labels == 3, lay["water"] & ~lay["road"])
    assert set(np.unique(scene.labels[~(lay["building"] | lay["road"] | lay["water"])])) <= {0, 1}
    assert not (lay["building"] & (lay["water"] | lay["road"])).any()
    assert lay["double_bounce"].any() and not (lay["double_bounce"] & ~lay["building"]).any()
    assert lay["sun_shadow"].any() and not (lay["sun_shadow"] & lay["building"]).any()


def test_optical_physics_vegetation_nir_and_dark_water(scene):
    veg, water = scene.labels == 0, scene.labels == 3
    nir, red = scene.optical[3], scene.optical[2]
    # Vegetation: NIR well above red (the red edge); water: dark in the NIR.
    assert np.median(nir[veg]) > 3 * np.median(red[veg])
    assert np.median(nir[water]) < 0.05 < np.median(nir[veg])


def test_sar_physics_water_dark_double_bounce_bright_shadow_floor(scene):
    vv = scene.sar[0]
    water, veg = scene.labels == 3, scene.labels == 0
    layers = scene.layers
    assert layers["double_bounce"].any() and layers["radar_shadow"].any() and layers["layover"].any()
    # Specular water is ~10 dB darker than vegetated land (speckle included: compare medians).
    assert np.median(vv[water]) < np.median(vv[veg]) - 8
    # Dihedral returns are the brightest targets in the scene.
    assert np.median(vv[layers["double_bounce"]]) > np.percentile(vv[veg], 99)
    # Radar shadow carries no signal: the (speckled) noise floor.
    shadow = vv[layers["radar_shadow"] & ~layers["layover"] & ~layers["double_bounce"]]
    assert np.median(shadow) == -35.0 and shadow.max() < -25.0
    # Layover lies toward the sensor (west): its mean column is left of the building footprints'.
    cols = np.arange(128)[None, :].repeat(128, 0)
    assert cols[layers["layover"]].mean() < cols[layers["building"]].mean()


def test_speckle_has_the_gamma_statistics_of_its_looks():
    # A homogeneous scene of one parcel: intensity ratio to the mean should have var ~ 1/L.
    sc = render_testbed_scene(128, 128, seed=1, parcels=1, buildings=0, looks=4.0)
    land = (sc.labels <= 1) & ~sc.layers["road"] & ~sc.layers["water"]
    lin = 10 ** (sc.sar[1][land] / 10)  # VH: no smooth moisture field on this band
    ratio = lin / lin.mean()
    assert ratio.var() == pytest.approx(1 / 4.0, rel=0.15)


def _edges(x: np.ndarray, k: int = 4) -> np.ndarray:
    # k x k multilooking first: speckle would otherwise swamp every edge in the SAR image.
    h, w = x.shape
    gy, gx = np.gradient(x.reshape(h // k, k, w // k, k).mean((1, 3)))
    return np.hypot(gy, gx)


def test_modalities_share_outlines_but_not_intensities(scene):
    lum = M.optical_luminance(scene.optical, (2, 1, 0))
    sar = M.sar_intensity(scene.sar)
    other = M.sar_intensity(render_testbed_scene(128, 128, seed=57).sar)
    # Shared structure: edges of the paired images co-locate, those of an unrelated scene do not.
    assert M.pearson(_edges(lum), _edges(sar)) > M.pearson(_edges(lum), _edges(other)) + 0.15
    # Heterogeneity: raw intensities barely agree patch by patch (low SSIM, the paper's premise).
    assert np.nanmean(M.patch_ssim(M.unit_range(lum), M.unit_range(sar), 16)) < 0.3


def test_write_testbed_follows_the_prepared_dataset_contract(tmp_path):
    from codemae_cli.data.shards import PreparedDataset

    root = write_testbed(tmp_path / "tb", scenes=2, size=96, tile=32, seed=3)
    ds = PreparedDataset(root)
    assert len(ds) == 18 and ds.tile == 32
    assert ds.classes == [CLASSES[k] for k in sorted(CLASSES)]
    assert {s: len(ds.indices(s)) for s in ("train", "val", "test")} == {"train": 6, "val": 6, "test": 6}
    chip = ds.read(int(ds.indices("val")[0]))
    assert chip["optical"].shape == (4, 32, 32) and chip["sar"].shape == (2, 32, 32) and chip["label"].shape == (32, 32)
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["paired"] is True and meta["sar"]["scale"] == "db"
    assert len(meta["stats"]["optical"]["mean"]) == 4 and len(meta["stats"]["sar"]["std"]) == 2
    # Stats are those of the train chips.
    train = np.stack([ds.read(i)["sar"] for i in ds.indices("train")])
    np.testing.assert_allclose(meta["stats"]["sar"]["mean"], train.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert (root / "scenes" / "scene001_sar.tif").is_file()
    # Footprints in the index are the chips' windows: 32 m squares.
    assert np.allclose(ds.index.geometry.area, 32.0 * 32.0)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_representation_metrics_on_handmade_features():
    from codemae_cli.analysis.analyze import representation_metrics

    rng = np.random.default_rng(0)
    n, d, h, w, p = 6, 8, 2, 2, 4
    f = rng.normal(size=(n, d, h, w))
    lum = rng.uniform(size=(n, h * p, w * p))
    valid = np.ones_like(lum, dtype=bool)
    valid[0, :p, :p] = False  # one invalid patch is left out of the correlation
    r = representation_metrics(f, f.copy(), lum, lum.copy(), valid, p)
    assert r["similarity"]["patches_colocated"] == pytest.approx(1.0)
    assert r["modality_gap"]["chips"] == pytest.approx(0.0, abs=1e-12)
    assert r["patch_ssim"]["mean"] == pytest.approx(1.0)
    assert r["patch_ssim"]["valid_patches"] == n * h * w - 1
    assert r["effective_rank"]["optical_tokens"] == pytest.approx(r["effective_rank"]["sar_tokens"])
    assert r["similarity"]["chips"]["retrieval_top1"] == 1.0
    assert math.isnan(r["similarity_vs_ssim"]["spearman"])  # constant similarity: undefined, not faked
    assert math.isnan(r["similarity_vs_ssim"]["spearman_abs"])

    # Token similarity built to equal each patch's SSIM: correlation 1, which also checks that
    # token (i, j) is paired with pixel block (i, j) of the same chip.
    noisy = lum + rng.uniform(0, 1, size=(n, h, w)).repeat(p, 1).repeat(p, 2) * rng.normal(size=lum.shape)
    ssim = np.stack([M.patch_ssim(M.unit_range(a), M.unit_range(b), p) for a, b in zip(lum, noisy, strict=True)])
    f_o = np.zeros((n, 2, h, w))
    f_o[:, 0] = 1.0
    f_s = np.stack([ssim, np.sqrt(1 - ssim**2)], axis=1)
    r = representation_metrics(f_o, f_s, lum, noisy, np.ones_like(valid), p)
    assert r["similarity_vs_ssim"]["spearman"] == pytest.approx(1.0)
    assert r["similarity_vs_ssim"]["pearson"] == pytest.approx(1.0)
