"""Representation metrics behind the paper's claims, in plain numpy.

Every function takes numpy arrays or torch tensors (converted with ``_np``) and returns numpy
values, so the metrics are testable on hand-made inputs with known answers:

- ``effective_rank`` / ``singular_spectrum``: dimensional collapse. The effective rank is
  ``exp(H(p))`` with ``p_k = s_k / sum(s)`` the normalised singular values (Roy & Vetterli 2007,
  used as RankMe by Garrido et al. 2023). A matrix with r equal non-zero singular values has
  effective rank exactly r; a collapsed representation has a small one.
- ``modality_gap``: distance between the centroids of the L2-normalised optical and SAR
  features (Liang et al. 2022). 0 when the two clouds share a centre; up to 2 on the sphere.
- ``paired_similarity``: mean cosine of a chip's optical and SAR embeddings (paired) against
  the mean over mismatched pairs (unpaired). Rigid contrast drives the paired value up; a
  useful joint representation keeps paired > unpaired without forcing them to be identical.
- ``patch_ssim``: structural similarity of co-located optical and SAR patches, computed from
  the patch statistics (one SSIM value per patch). It measures how much of a patch's structure
  the two modalities actually share, which at high resolution varies a lot from patch to patch.
- ``patch_cosine`` and ``rank_correlation``/``pearson``: does the model's per-patch cross-modal
  agreement follow the patch's physical agreement (SSIM)? The paper's premise is that it should
  align the patches that share structure and not force the others together.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = 1e-12


def _np(x: Any) -> np.ndarray:
    """numpy float64 view of an array or (possibly CUDA, possibly grad-tracking) tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def singular_spectrum(features: Any, center: bool = True) -> np.ndarray:
    """Singular values of an (N, D) feature matrix, descending, normalised to sum to 1.

    Centering removes the shared mean direction, which otherwise dominates the first singular
    value of non-negative or biased features and hides collapse in the rest of the spectrum.
    """
    x = _np(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    total = s.sum()
    if total <= _EPS:
        return np.zeros_like(s)
    return s / total


def effective_rank(features: Any, center: bool = True) -> float:
    """exp(entropy) of the normalised singular values of (N, D) features; in [1, min(N, D)].

    Returns 0.0 for an all-zero (or, with centering, constant) matrix, which has no spectrum.
    """
    p = singular_spectrum(features, center=center)
    p = p[p > _EPS]
    if p.size == 0:
        return 0.0
    return float(np.exp(-(p * np.log(p)).sum()))


def l2_normalize(x: Any, axis: int = -1) -> np.ndarray:
    x = _np(x)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def modality_gap(optical: Any, sar: Any) -> float:
    """Euclidean distance between the centroids of L2-normalised (N, D) optical and SAR features."""
    a, b = l2_normalize(optical), l2_normalize(sar)
    if a.shape[1] != b.shape[1]:
        raise ValueError("optical and SAR features must have the same width")
    return float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))


def paired_similarity(optical: Any, sar: Any) -> dict[str, float]:
    """Cosine similarity of paired rows (same chip) versus unpaired rows (different chips).

    ``optical[i]`` and ``sar[i]`` describe the same chip. Returns ``paired`` (mean of the
    diagonal of the cosine matrix), ``unpaired`` (mean off the diagonal), their difference
    ``margin``, and ``retrieval_top1``: the fraction of optical rows whose most similar SAR row
    is their own partner (chance = 1 / N).
    """
    a, b = l2_normalize(optical), l2_normalize(sar)
    if a.shape != b.shape:
        raise ValueError("paired features must have the same shape")
    n = a.shape[0]
    sim = a @ b.T
    paired = float(np.mean(np.diag(sim)))
    if n > 1:
        unpaired = float((sim.sum() - np.trace(sim)) / (n * n - n))
    else:
        unpaired = float("nan")
    top1 = float(np.mean(np.argmax(sim, axis=1) == np.arange(n)))
    return {"paired": paired, "unpaired": unpaired, "margin": paired - unpaired, "retrieval_top1": top1}


def patch_cosine(optical: Any, sar: Any) -> np.ndarray:
    """Cosine similarity of co-located tokens: (B, D, h, w) x2 -> (B, h, w)."""
    a, b = _np(optical), _np(sar)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError("token maps must both be (B, D, h, w) with the same shape")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), _EPS)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), _EPS)
    return (a * b).sum(axis=1)


def unit_range(image: Any, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Robust per-image stretch to [0, 1] (percentiles over finite pixels); NaN stays NaN.

    SSIM needs both images on one dynamic range, and optical reflectance and SAR dB have
    nothing in common but their structure, so each image is stretched on its own.
    """
    x = _np(image)
    finite = np.isfinite(x)
    if not finite.any():
        return np.full_like(x, np.nan)
    lo, hi = np.percentile(x[finite], [low, high])
    if hi - lo <= _EPS:
        out = np.zeros_like(x)
    else:
        out = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    out[~finite] = np.nan
    return out


def patch_ssim(x: Any, y: Any, patch: int, data_range: float = 1.0) -> np.ndarray:
    """SSIM of every non-overlapping ``patch`` x ``patch`` block from the block statistics.

    x, y: (H, W) or (B, H, W) on the same ``data_range``; H and W are cropped to multiples of
    ``patch``. Returns (h, w) or (B, h, w). Uses the standard constants
    C1 = (0.01 L)^2, C2 = (0.03 L)^2; a block containing NaN gives NaN. Identical blocks give 1,
    a block and its negative give about -1 (for non-flat blocks).
    """
    a, b = _np(x), _np(y)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    squeeze = a.ndim == 2
    if squeeze:
        a, b = a[None], b[None]
    if a.ndim != 3:
        raise ValueError("images must be (H, W) or (B, H, W)")
    n, height, width = a.shape
    h, w = height // patch, width // patch
    if h == 0 or w == 0:
        raise ValueError(f"images of {height}x{width} are smaller than one {patch}-pixel patch")

    def blocks(v: np.ndarray) -> np.ndarray:
        # (B, H, W) -> (B, h, w, p*p): one row of pixels per patch, in token order.
        v = v[:, : h * patch, : w * patch].reshape(n, h, patch, w, patch)
        return v.transpose(0, 1, 3, 2, 4).reshape(n, h, w, patch * patch)

    pa, pb = blocks(a), blocks(b)
    mu_a, mu_b = pa.mean(-1), pb.mean(-1)
    var_a, var_b = pa.var(-1), pb.var(-1)
    cov = ((pa - mu_a[..., None]) * (pb - mu_b[..., None])).mean(-1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim[0] if squeeze else ssim


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation over the finite pairs; NaN when either side is constant."""
    a, b = _np(x).ravel(), _np(y).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if den <= _EPS:
        return float("nan")
    return float((a * b).sum() / den)


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    sorted_v = v[order]
    # Group equal values and give each group the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    for s, e in zip(starts, ends, strict=False):
        if e - s > 1:
            ranks[order[s:e]] = (s + e - 1) / 2.0
    return ranks


def rank_correlation(x: Any, y: Any) -> float:
    """Spearman's rank correlation over the finite pairs."""
    a, b = _np(x).ravel(), _np(y).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    return pearson(_ranks(a[keep]), _ranks(b[keep]))


def similarity_ssim_correlation(similarity: Any, ssim: Any) -> dict[str, float]:
    """How well per-patch cross-modal similarity follows per-patch SSIM (Pearson and Spearman)."""
    return {"pearson": pearson(similarity, ssim), "spearman": rank_correlation(similarity, ssim)}


def optical_luminance(optical: Any, rgb: tuple[int, int, int] | None = (0, 1, 2)) -> np.ndarray:
    """One structure channel from an optical stack (..., C, H, W).

    The luminance 0.299 R + 0.587 G + 0.114 B when ``rgb`` names three band indices (CDR's own,
    model/targets.py ``luminance``), else the band mean. NaN propagates.
    """
    x = _np(optical)
    if rgb is not None and x.shape[-3] >= 3:
        # imported here: importing the numpy metrics must not import torch
        from codemae_cli.model.targets import luminance

        return luminance(*(x[..., i, :, :] for i in rgb))
    return x.mean(axis=-3)


def sar_intensity(sar: Any) -> np.ndarray:
    """One structure channel from a SAR stack (..., C, H, W) in dB: the polarisation mean."""
    return _np(sar).mean(axis=-3)


__all__ = [
    "effective_rank",
    "l2_normalize",
    "modality_gap",
    "optical_luminance",
    "paired_similarity",
    "patch_cosine",
    "patch_ssim",
    "pearson",
    "rank_correlation",
    "sar_intensity",
    "similarity_ssim_correlation",
    "singular_spectrum",
    "unit_range",
]
