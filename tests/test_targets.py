"""Reconstruction targets: patchify round trip and degradations against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codemae_cli.model.targets import (
    degraded_target,
    hog_cells_target,
    masked_mse,
    median_blur,
    normalize_patches,
    patchify,
    ratio_gradient,
    target_dim,
    unpatchify,
)

torch.set_num_threads(1)


def test_patchify_unpatchify_round_trip_and_layout():
    x = torch.randn(2, 3, 16, 24)
    p = 8
    t = patchify(x, p)
    assert t.shape == (2, 2 * 3, 8 * 8 * 3)
    torch.testing.assert_close(unpatchify(t, p, 3, (2, 3)), x, rtol=0, atol=0)
    # patch (row 1, col 2) holds that window, ordered (row, col, channel)
    window = x[1, :, 8:16, 16:24]  # (C, p, p)
    torch.testing.assert_close(t[1, 1 * 3 + 2], window.permute(1, 2, 0).reshape(-1))


def test_channel_degradation_is_luminance_then_per_patch_norm():
    x = torch.randn(2, 4, 16, 16)
    p = 8
    t = degraded_target(x, "optical", "channel", p, rgb_bands=(0, 1, 2))
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (B, H, W)
    patch = lum[0, 8:16, 0:8].reshape(-1)  # patch (1, 0)
    expected = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
    torch.testing.assert_close(t[0, 2], expected, atol=1e-5, rtol=1e-5)
    assert t.shape == (2, 4, target_dim("channel", 4, p))
    # non-RGB optical and SAR: band mean
    t_mean = degraded_target(x, "optical", "channel", p, rgb_bands=None, norm_pix=False)
    torch.testing.assert_close(t_mean[1, 3], x[1, :, 8:16, 8:16].mean(0).reshape(-1))
    t_sar = degraded_target(x[:, :2], "sar", "channel", p, rgb_bands=(0, 1, 2), norm_pix=False)
    torch.testing.assert_close(t_sar[0, 1], x[0, :2, 0:8, 8:16].mean(0).reshape(-1))


def _reference_repeat_and_normalise(x: torch.Tensor, p: int) -> torch.Tensor:
    """The reference's spatial reduction written out: patch means upsampled to pixels
    (repeat_interleave), patchified, each patch normalised over all p*p*C values (unbiased var)."""
    pooled = torch.nn.functional.avg_pool2d(x, p, p)
    up = pooled.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    t = patchify(up, p)  # (B, N, p*p*C), every per-channel value repeated p*p times
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


def test_spatial_is_the_reference_joint_normalisation_of_patch_means():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    p = 8
    s = degraded_target(x, "optical", "spatial", p, rgb_bands=(0, 1, 2))
    assert s.shape == (2, 4, 3) and target_dim("spatial", 3, p) == 3
    ref = _reference_repeat_and_normalise(x, p).reshape(2, 4, p * p, 3)
    assert torch.equal(ref, ref[:, :, :1].expand_as(ref))  # the p*p repeats are identical
    torch.testing.assert_close(s, ref[:, :, 0], atol=1e-5, rtol=1e-5)
    # a colour-contrast target: non-zero for optical, zero for identical SAR channels
    assert s.abs().mean() > 0.3
    same = x[:, :1].repeat(1, 2, 1, 1)
    assert degraded_target(same, "sar", "spatial", p).abs().max() < 1e-3
    # without norm_pix: the raw per-band means (codemae's spatial_mean)
    torch.testing.assert_close(degraded_target(x, "optical", "spatial", p, norm_pix=False),
                               degraded_target(x, "optical", "spatial_mean", p))


def test_dual_collapses_to_zero_like_the_reference():
    x = torch.randn(2, 3, 16, 16)
    d = degraded_target(x, "optical", "dual", 8, rgb_bands=(0, 1, 2))
    assert d.shape == (2, 4, 1)
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    ref = _reference_repeat_and_normalise(lum, 8)  # (B, N, p*p): constant per patch, normalised
    torch.testing.assert_close(d, ref[:, :, :1], atol=1e-3, rtol=0)
    assert torch.all(d == 0)


def test_codemae_patch_mean_variants():
    x = torch.randn(2, 3, 16, 16)
    s = degraded_target(x, "sar", "spatial_mean", 8)
    assert s.shape == (2, 4, 3)
    torch.testing.assert_close(s[1, 2], x[1, :, 8:16, 0:8].mean(dim=(1, 2)))
    d = degraded_target(x, "optical", "dual_mean", 8, rgb_bands=(0, 1, 2))
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert d.shape == (2, 4, 1)
    torch.testing.assert_close(d[0, 3, 0], lum[0, 8:16, 8:16].mean())


def _hand_hog(gray: np.ndarray, bins: int = 9, cell: int = 8, window: int = 16) -> np.ndarray:
    """MaskFeat's HOGLayerC written out pixel by pixel: (H, W) -> cell histograms (bins, H/8, W/8)."""
    H, W = gray.shape
    g = np.pad(gray, 1, mode="reflect")
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    ky = kx.T
    n = (np.arange(window) - (window - 1) / 2) / (window // 2)
    g1 = np.exp(-0.5 * n**2)
    gk = np.outer(g1, g1)
    gk /= gk.sum()
    hist = np.zeros((bins, H // cell, W // cell))
    for i in range(H):
        for j in range(W):
            win = g[i : i + 3, j : j + 3]
            gx, gy = (kx * win).sum(), (ky * win).sum()
            b = math.floor(math.atan2(gx, gy) / math.pi * bins) % bins
            hist[b, i // cell, j // cell] += math.hypot(gx, gy) * gk[i % window, j % window]
    return hist


def test_hog_is_the_reference_cell_histogram_upsampled_and_normalised_per_patch():
    torch.manual_seed(1)
    src = torch.rand(1, 3, 32, 32)  # source scale in [0, 1]
    p = 16
    t = degraded_target(torch.randn(1, 3, 32, 32), "optical", "hog", p, rgb_bands=(0, 1, 2), source=src)
    assert t.shape == (1, 4, 2304) and target_dim("hog", 3, p) == 2304
    lum = (0.299 * src[0, 0] + 0.587 * src[0, 1] + 0.114 * src[0, 2]).double().numpy()
    cells = torch.from_numpy(_hand_hog(lum)).float()[None]  # (1, 9, 4, 4)
    up = torch.nn.functional.interpolate(cells, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(t, normalize_patches(patchify(up, p)), atol=2e-4, rtol=1e-4)
    # the normalised input is not used: only the source image decides the target
    t2 = degraded_target(torch.zeros(1, 3, 32, 32), "optical", "hog", p, rgb_bands=(0, 1, 2), source=src)
    torch.testing.assert_close(t, t2)


def test_codemae_hog_cells_orientation_bins():
    p = 8
    ramp = torch.arange(16.0).repeat(16, 1)[None, None]  # brightness grows along x: one orientation
    h = hog_cells_target(ramp, p)
    assert h.shape == (1, 4, 36)
    torch.testing.assert_close(h.norm(dim=-1), torch.ones(1, 4), atol=1e-5, rtol=0)
    bins = h.reshape(1, 4, 4, 9).sum(dim=2)[0, 0]  # sum over the 4 cells of patch 0
    assert bins.argmax().item() in (0, 8)  # horizontal gradient: angle 0 (or pi)
    vertical = ramp.transpose(-1, -2)
    bins_v = hog_cells_target(vertical, p).reshape(1, 4, 4, 9).sum(dim=2)[0, 0]
    assert bins_v.argmax().item() == 4  # angle pi/2 falls in the middle bin
    flat = hog_cells_target(torch.ones(1, 1, 16, 16), p)
    assert torch.all(flat == 0)
    assert degraded_target(ramp.repeat(1, 2, 1, 1), "sar", "hog_cells", p).shape == (1, 4, 36)


def test_sar_gradient_is_the_reference_mgf_of_the_source_image_without_stretch():
    torch.manual_seed(2)
    p = 8
    src = 0.05 + 0.1 * torch.rand(1, 2, 40, 40)  # a dark scene: a stretch would change the ratios
    t = degraded_target(torch.randn(1, 2, 40, 40), "sar", "sar_gradient", p, norm_pix=False, source=src)
    assert t.shape == (1, 25, 3 * p * p)
    grad = unpatchify(t, p, 3, (5, 5))  # (1, 3, H, W): radii 9, 13, 17
    x = np.pad(src.mean(1)[0].double().numpy(), 9, mode="reflect") + 1e-2  # SARATR-X GF, r = 9
    r, i, j = 9, 20, 17
    win = x[i : i + 2 * r + 1, j : j + 2 * r + 1]
    gx = math.log(win[:, : r + 1].sum() / win[:, r:].sum())  # M11 / M21 masks
    gy = math.log(win[: r + 1].sum() / win[r:].sum())  # M13 / M23 masks
    torch.testing.assert_close(grad[0, 0, i, j].double(), torch.tensor(math.hypot(gx, gy), dtype=torch.float64),
                               atol=1e-5, rtol=1e-4)
    # per-patch normalisation on top, as every reference target
    normed = degraded_target(torch.zeros(1, 2, 40, 40), "sar", "sar_gradient", p, source=src)
    torch.testing.assert_close(normed, normalize_patches(t), atol=1e-4, rtol=1e-4)


def test_none_is_full_per_patch_normalised_pixels():
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(degraded_target(x, "sar", "none", 8), normalize_patches(patchify(x, 8)))


def test_median_blur_matches_hand_median_with_zero_padding():
    x = torch.randn(1, 1, 9, 9)
    m = median_blur(x, 5)
    # interior pixel: plain 5x5 median (torch's lower median for an odd count equals the true one)
    torch.testing.assert_close(m[0, 0, 4, 4], x[0, 0, 2:7, 2:7].reshape(-1).median())
    # corner: the window reaches into zero padding, as kornia's MedianBlur in the reference
    corner = torch.nn.functional.pad(x, (2, 2, 2, 2))[0, 0, :5, :5].reshape(-1).median()
    torch.testing.assert_close(m[0, 0, 0, 0], corner)
    # a constant image is unchanged away from the border
    c = torch.full((1, 2, 8, 8), 3.0)
    torch.testing.assert_close(median_blur(c)[..., 2:-2, 2:-2], c[..., 2:-2, 2:-2])


def test_ratio_gradient_is_log_ratio_of_half_window_means():
    x = torch.rand(1, 1, 40, 40) + 0.5
    r = 3
    g = ratio_gradient(x, radii=(r,))
    i, j = 20, 20
    xp = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")[0, 0]
    pi, pj = i + r, j + r  # padded coordinates
    left = xp[pi - r : pi + r + 1, pj - r : pj + 1].mean()
    right = xp[pi - r : pi + r + 1, pj : pj + r + 1].mean()
    up = xp[pi - r : pi + 1, pj - r : pj + r + 1].mean()
    down = xp[pi : pi + r + 1, pj - r : pj + r + 1].mean()
    expected = torch.sqrt(torch.log(left / right) ** 2 + torch.log(up / down) ** 2)
    torch.testing.assert_close(g[0, 0, i, j], expected, atol=1e-5, rtol=1e-4)
    # multiplicative invariance: scaling the image (speckle-like gain) changes nothing
    torch.testing.assert_close(ratio_gradient(3.0 * x, radii=(r,)), g, atol=1e-5, rtol=1e-4)
    full = degraded_target(torch.randn(2, 2, 32, 32), "sar", "sar_gradient", 8)  # clamped to [0, 1]
    assert full.shape == (2, 16, target_dim("sar_gradient", 2, 8)) and torch.isfinite(full).all()


def test_masked_mse_counts_only_hidden_patches():
    pred = torch.zeros(1, 4, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 16) / 2)
    assert math.isclose(masked_mse(target, target, mask).item(), 0.0)


def _bands_meta(names) -> dict:
    return {"optical": {"bands": list(names)}}


def test_luminance_reads_red_green_blue_where_the_band_names_say():
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.model import ModelConfig, build_model

    cfg = ModelConfig(preset="tiny", img_size=16, patch_size=8)
    cfg.okd.teacher = "ema"
    bgrn = choose_rgb([("bgrn", _bands_meta(["blue", "green", "red", "nir"]))])
    model = build_model(cfg, 4, 2, rgb=bgrn)
    assert model.rgb_bands == (2, 1, 0) and model.luminance.source == "names"
    # the target the model computes, against the luminance by hand on a tiny image
    x = torch.arange(4 * 16 * 16, dtype=torch.float32).reshape(1, 4, 16, 16).sin()
    t = degraded_target(x, "optical", model.cfg.cdr.degradation, 8, model.rgb_bands, norm_pix=False)
    lum = 0.299 * x[0, 2] + 0.587 * x[0, 1] + 0.114 * x[0, 0]  # red (band 3), green (2), blue (1)
    torch.testing.assert_close(t[0, 1], lum[0:8, 8:16].reshape(-1))
    assert not torch.allclose(t[0, 1], (0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2])[0:8, 8:16].reshape(-1))
    # model.cdr.rgb_bands still wins (an empty list: the band mean)
    cfg.cdr.rgb_bands = [0, 1, 2]
    assert build_model(cfg, 4, 2, rgb=bgrn).rgb_bands == (0, 1, 2)
    cfg.cdr.rgb_bands = []
    assert build_model(cfg, 4, 2, rgb=bgrn).rgb_bands is None


def test_luminance_bands_unchanged_where_the_names_do_not_say():
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.model.targets import choose_luminance

    def lum(names, count=None):
        return choose_luminance(count or len(names), None, choose_rgb([("d", _bands_meta(names))], count)).bands

    assert lum(["PAN"]) is None and lum(["B1", "B2"]) is None  # the band mean (of one band: the band)
    assert lum(["B1", "B2", "B3"]) == (0, 1, 2) and lum(["R", "G", "B"]) == (0, 1, 2)
    assert lum(["B1", "B2", "B3", "B4"]) == (0, 1, 2)  # RGB+NIR without telling names: the first three
    assert lum(["red", "green", "blue", "nir"]) == (0, 1, 2)
    assert lum([f"B{k}" for k in range(1, 6)]) is None  # more bands, names that do not say: the band mean
    assert lum(["B4", "B3", "B2", "B8", "B11"]) == (0, 1, 2)  # described Sentinel-2 bands: their colours
    # no names at all: the decision on band order alone, as before for 3 and 4 bands
    assert [choose_luminance(n, None).bands for n in (1, 2, 3, 4, 5)] == [None, None, (0, 1, 2), (0, 1, 2), None]
