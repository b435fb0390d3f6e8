"""The analysis maths on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from codemae_cli.analysis import metrics as M


def _orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))
    return q[:, :k]


def test_effective_rank_of_equal_spectrum_low_rank_matrix_is_its_rank():
    # U diag(1,1,1,1,1) V^T: five equal singular values -> entropy log 5 -> effective rank 5.
    x = _orthonormal(200, 5, 0) @ _orthonormal(64, 5, 1).T
    assert M.effective_rank(x, center=False) == pytest.approx(5.0, rel=1e-9)
    spectrum = M.singular_spectrum(x, center=False)
    assert spectrum.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(spectrum[:5], 0.2, atol=1e-9)
    assert spectrum[5:].max() < 1e-12


def test_effective_rank_of_unequal_spectrum_matches_entropy_formula():
    s = np.array([4.0, 2.0, 1.0, 1.0])
    x = _orthonormal(50, 4, 2) @ np.diag(s) @ _orthonormal(16, 4, 3).T
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    assert M.effective_rank(x, center=False) == pytest.approx(expected, rel=1e-9)
    assert 1.0 < expected < 4.0


def test_effective_rank_rank_one_and_degenerate():
    x = np.outer(np.arange(1, 11, dtype=float), np.ones(8))
    assert M.effective_rank(x, center=False) == pytest.approx(1.0)
    # Centering a matrix whose rows are all identical leaves nothing: no spectrum.
    assert M.effective_rank(np.ones((10, 4))) == 0.0
    with pytest.raises(ValueError):
        M.effective_rank(np.ones(5))


def test_effective_rank_of_isotropic_gaussian_is_near_full():
    x = np.random.default_rng(0).normal(size=(4000, 16))
    assert 15.0 < M.effective_rank(x) <= 16.0


def test_modality_gap_of_identical_and_shifted_clouds():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert M.modality_gap(a, a.copy()) == pytest.approx(0.0, abs=1e-12)
    # Two tight clouds around orthogonal unit vectors: centroids e1 and e2 -> gap sqrt(2).
    e1, e2 = np.eye(8)[0], np.eye(8)[1]
    o = e1 + 1e-4 * rng.normal(size=(500, 8))
    s = e2 + 1e-4 * rng.normal(size=(500, 8))
    assert M.modality_gap(o, s) == pytest.approx(math.sqrt(2.0), abs=1e-3)
    # Antipodal clouds: maximal gap 2. Scale does not matter (features are L2-normalised first).
    assert M.modality_gap(3 * o, -7 * o) == pytest.approx(2.0, abs=1e-6)


def test_paired_similarity_identical_pairs_and_orthogonal_negatives():
    x = np.eye(6)  # each row orthogonal to the others
    out = M.paired_similarity(x, 2 * x)
    assert out["paired"] == pytest.approx(1.0)
    assert out["unpaired"] == pytest.approx(0.0)
    assert out["margin"] == pytest.approx(1.0)
    assert out["retrieval_top1"] == 1.0
    # Shuffle the partners: paired and unpaired swap roles, retrieval drops to chance-level.
    perm = np.roll(np.arange(6), 1)
    out = M.paired_similarity(x, x[perm])
    assert out["paired"] == pytest.approx(0.0)
    assert out["unpaired"] == pytest.approx(1.0 / 5.0)
    assert out["retrieval_top1"] == 0.0


def test_patch_cosine():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 8, 3, 4))
    np.testing.assert_allclose(M.patch_cosine(a, a * 5), 1.0, atol=1e-12)
    np.testing.assert_allclose(M.patch_cosine(a, -a), -1.0, atol=1e-12)
    assert M.patch_cosine(a, a).shape == (2, 3, 4)


def test_patch_ssim_identical_negated_and_independent():
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(64, 48))
    ssim = M.patch_ssim(img, img, 16)
    assert ssim.shape == (4, 3)
    np.testing.assert_allclose(ssim, 1.0, atol=1e-12)
    # A structure-reversed patch with the same mean/variance: SSIM close to -1.
    assert M.patch_ssim(img, 1.0 - img, 16).mean() < -0.9
    # Independent noise shares no structure: SSIM near 0.
    other = rng.uniform(size=(64, 48))
    assert abs(M.patch_ssim(img, other, 16).mean()) < 0.1
    # Batched input, crop to whole patches, NaN blocks stay NaN.
    batch = np.stack([img, img])
    batch2 = batch.copy()
    batch2[1, 0, 0] = np.nan
    out = M.patch_ssim(batch, batch2, 20)
    assert out.shape == (2, 3, 2)
    assert np.isnan(out[1, 0, 0]) and np.isfinite(out[1, 1, 1]) and out[0, 0, 0] == pytest.approx(1.0)


def test_patch_ssim_matches_closed_form_for_a_scaled_patch():
    # y = x / 2 on one block: mu_y = mu_x / 2, var_y = var_x / 4, cov = var_x / 2.
    x = np.random.default_rng(1).uniform(size=(8, 8))
    mu, var = x.mean(), x.var()
    c1, c2 = 1e-4, 9e-4
    expected = ((2 * mu * mu / 2 + c1) * (2 * var / 2 + c2)) / ((mu**2 + mu**2 / 4 + c1) * (var + var / 4 + c2))
    assert M.patch_ssim(x, x / 2, 8)[0, 0] == pytest.approx(expected, rel=1e-12)


def test_patch_ssim_rejects_bad_shapes():
    with pytest.raises(ValueError):
        M.patch_ssim(np.zeros((8, 8)), np.zeros((8, 9)), 4)
    with pytest.raises(ValueError):
        M.patch_ssim(np.zeros((8, 8)), np.zeros((8, 8)), 16)


def test_correlations_known_answers():
    x = np.arange(10.0)
    assert M.pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert M.pearson(x, -x) == pytest.approx(-1.0)
    # Monotone but non-linear: Spearman exactly 1, Pearson below 1.
    assert M.rank_correlation(x, np.exp(x)) == pytest.approx(1.0)
    assert M.pearson(x, np.exp(x)) < 0.9
    # Ties get average ranks; NaN pairs are dropped; constants give NaN.
    assert M.rank_correlation([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert M.pearson([1, 2, np.nan, 4], [2, 4, 100, 8]) == pytest.approx(1.0)
    assert math.isnan(M.pearson(np.ones(5), x[:5]))
    out = M.similarity_ssim_correlation(x, x**2)
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] < 1.0


def test_unit_range_and_structure_channels():
    x = np.linspace(-30, 5, 100).reshape(10, 10)
    x[0, 0] = np.nan
    u = M.unit_range(x, 0, 100)
    assert np.isnan(u[0, 0]) and np.nanmin(u) == 0.0 and np.nanmax(u) == 1.0
    assert np.all(M.unit_range(np.full((4, 4), 3.0)) == 0.0)
    rgb = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 2.0), np.full((2, 2), 3.0), np.zeros((2, 2))])
    np.testing.assert_allclose(M.optical_luminance(rgb), 0.299 + 2 * 0.587 + 3 * 0.114)
    np.testing.assert_allclose(M.optical_luminance(rgb, rgb=None), 1.5)
    np.testing.assert_allclose(M.sar_intensity(rgb[:2]), 1.5)


def test_analysis_luminance_is_cdrs_own():
    """The analyses' structure channel of an optical image is CDR's luminance target, value for
    value, whatever bands are red, green, blue: one definition of the weights serves both."""
    import torch

    from codemae_cli.model.targets import LUMINANCE, luminance, one_channel

    assert sum(LUMINANCE) == pytest.approx(1.0)  # a grey image keeps its value
    stack = np.random.default_rng(0).random((2, 4, 5, 6))  # (B, C, H, W)
    for bands in ((0, 1, 2), (2, 1, 0), (3, 2, 1)):
        cdr = one_channel(torch.from_numpy(stack), "optical", bands)[:, 0].numpy()  # (B, H, W)
        np.testing.assert_array_equal(M.optical_luminance(stack, bands), cdr)
        np.testing.assert_array_equal(cdr, luminance(*(stack[:, b] for b in bands)))


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    t = torch.eye(4, requires_grad=True)
    assert M.effective_rank(t, center=False) == pytest.approx(4.0)
    assert M.modality_gap(t, t) == pytest.approx(0.0)
