"""Reconstruction targets: patchify round trip and degradations against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from codemae_cli.model.targets import (
    degraded_target,
    hog_target,
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


def test_spatial_and_dual_are_patch_means():
    x = torch.randn(2, 3, 16, 16)
    s = degraded_target(x, "sar", "spatial", 8)
    assert s.shape == (2, 4, 3)
    torch.testing.assert_close(s[1, 2], x[1, :, 8:16, 0:8].mean(dim=(1, 2)))
    d = degraded_target(x, "optical", "dual", 8, rgb_bands=(0, 1, 2))
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert d.shape == (2, 4, 1)
    torch.testing.assert_close(d[0, 3, 0], lum[0, 8:16, 8:16].mean())


def test_none_is_full_per_patch_normalised_pixels():
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(degraded_target(x, "sar", "none", 8), normalize_patches(patchify(x, 8)))


def test_median_blur_matches_hand_median():
    x = torch.randn(1, 1, 9, 9)
    m = median_blur(x, 5)
    # interior pixel: plain 5x5 median (torch's lower median for an odd count equals the true one)
    torch.testing.assert_close(m[0, 0, 4, 4], x[0, 0, 2:7, 2:7].reshape(-1).median())
    # constant image is unchanged
    c = torch.full((1, 2, 8, 8), 3.0)
    torch.testing.assert_close(median_blur(c), c)


def test_hog_orientation_bins():
    p = 8
    ramp = torch.arange(16.0).repeat(16, 1)[None, None]  # brightness grows along x: one orientation
    h = hog_target(ramp, p)
    assert h.shape == (1, 4, 36)
    torch.testing.assert_close(h.norm(dim=-1), torch.ones(1, 4), atol=1e-5, rtol=0)
    bins = h.reshape(1, 4, 4, 9).sum(dim=2)[0, 0]  # sum over the 4 cells of patch 0
    assert bins.argmax().item() in (0, 8)  # horizontal gradient: angle 0 (or pi)
    vertical = ramp.transpose(-1, -2)
    bins_v = hog_target(vertical, p).reshape(1, 4, 4, 9).sum(dim=2)[0, 0]
    assert bins_v.argmax().item() == 4  # angle pi/2 falls in the middle bin
    flat = hog_target(torch.ones(1, 1, 16, 16), p)
    assert torch.all(flat == 0)


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
    full = degraded_target(torch.randn(2, 2, 32, 32), "sar", "sar_gradient", 8)
    assert full.shape == (2, 16, target_dim("sar_gradient", 2, 8)) and torch.isfinite(full).all()


def test_masked_mse_counts_only_hidden_patches():
    pred = torch.zeros(1, 4, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 16) / 2)
    assert math.isclose(masked_mse(target, target, mask).item(), 0.0)
