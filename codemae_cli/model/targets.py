"""Reconstruction targets: patchify/unpatchify, per-patch normalisation, CDR degradations.

All functions take dataset-normalised images (B, C, H, W) and return per-patch targets
(B, N, K) in the patch order of the encoder (row-major over the (H/p, W/p) grid). The HOG and
ratio-gradient targets are computed, as in the reference code, on the images at their source
scale in [0, 1] (``source=``, see model/source.py), not on the normalised ones.

CDR degradations (what the cross decoder must predict of the OTHER modality). The reference
code's forms, under its names (per-patch normalisation is ``norm_pix``):
  none          all bands, full resolution, per-patch normalised (msGFM-like baseline)  K = C p^2
  channel       one channel (optical luminance / band mean, SAR polarisation mean),
                per-patch normalised (the reference setting)                           K = p^2
  spatial       per-band patch means, normalised jointly over the patch's bands (for
                optical a colour-contrast target; zero for identical bands)            K = C
  dual          channel, then spatial: one value per patch, always zero (the
                reference's target degenerates this way; kept for reproduction)        K = 1
  hog           9-bin orientation histogram per 8-px cell of the one-channel source
                image (Gaussian-weighted Sobel magnitudes), upsampled bilinearly to
                pixels, per-patch normalised (MaskFeat's HOGLayerC)                    K = 9 p^2
  sar_gradient  multi-scale ratio gradients (SARATR-X; speckle-robust) of the
                one-channel source image + 0.01 at half-window radii 9, 13, 17,
                per-patch normalised                                                  K = 3 p^2
  median        5 x 5 median filter of all bands, per-patch normalised                  K = C p^2
The reference repeats a patch's ``spatial``/``dual`` values over its p^2 pixels; the mean
squared error over the repeats is the one over the values, so K = C here (and the joint
normalisation uses the variance of the repeated vector, as the reference computes it).
codemae's own variants:
  spatial_mean  raw per-band patch means (not normalised)                               K = C
  dual_mean     patch mean of the one-channel image (not normalised)                   K = 1
  hog_cells     HOG of the normalised one-channel image, 2 x 2 cells per patch,
                9 bins, L2-normalised per patch                                        K = 36
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from codemae_cli.data.raster import RGBChoice, choose_rgb

LUMINANCE = (0.299, 0.587, 0.114)  # Rec. 601 weights of red, green, blue
DEGRADATIONS = ("none", "channel", "spatial", "dual", "hog", "sar_gradient", "median",
                 "spatial_mean", "dual_mean", "hog_cells")
# Degradations computed on the source-scale images rather than the normalised ones.
SOURCE_DEGRADATIONS = ("hog", "sar_gradient")
# Degradations whose optical target is one channel: the luminance (or the band mean).
ONE_CHANNEL_DEGRADATIONS = ("channel", "dual", "hog", "sar_gradient", "dual_mean", "hog_cells")
SAR_GRADIENT_RADII = (9, 13, 17)
SAR_GRADIENT_OFFSET = 1e-2  # added to the [0, 1] source image so the ratios stay finite
HOG_BINS = 9
HOG_CELL = 8  # px per histogram cell (reference: HOGLayerC pool=8)
HOG_WINDOW = 16  # px of the tiled Gaussian weighting window (std = HOG_WINDOW / 2)


def uses_luminance(cdr) -> bool:
    """Whether CDR (``model.cdr``) reduces the optical image to one channel (luminance / band mean)."""
    return cdr.enabled and cdr.degradation in ONE_CHANNEL_DEGRADATIONS


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), per patch ordered (row, col, channel) like MAE."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, h*p, w*p); the inverse of :func:`patchify`."""
    B = x.shape[0]
    h, w = grid
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def normalize_patches(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch mean/variance normalisation over the last dim (MAE's norm_pix_loss)."""
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    return (t - mean) / (var + eps) ** 0.5


def pixel_target(imgs: torch.Tensor, p: int, norm_pix: bool = True) -> torch.Tensor:
    t = patchify(imgs.float(), p)
    return normalize_patches(t) if norm_pix else t


def one_channel(imgs: torch.Tensor, modality: str, rgb_bands: Optional[Sequence[int]]) -> torch.Tensor:
    """Reduce to one channel: optical luminance 0.299R+0.587G+0.114B when ``rgb_bands`` names
    the R, G, B bands, otherwise (and for SAR) the band mean. (B, C, H, W) -> (B, 1, H, W)."""
    if modality == "optical" and rgb_bands:
        return luminance(*(imgs[:, i : i + 1] for i in rgb_bands))
    return imgs.mean(dim=1, keepdim=True)


def luminance(r, g, b):
    """0.299 R + 0.587 G + 0.114 B of three bands, torch tensors or numpy arrays alike: the one
    luminance of CDR's targets and of the analyses (analysis/metrics.py optical_luminance)."""
    return LUMINANCE[0] * r + LUMINANCE[1] * g + LUMINANCE[2] * b


def patch_mean(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C): the mean of every band over every patch."""
    return F.avg_pool2d(imgs, kernel_size=p, stride=p).flatten(2).transpose(1, 2)


def median_blur(imgs: torch.Tensor, k: int = 5) -> torch.Tensor:
    """k x k median filter per band with zero padding (kornia's MedianBlur, as the reference)."""
    B, C, H, W = imgs.shape
    r = k // 2
    x = F.pad(imgs, (r, r, r, r))
    x = F.unfold(x.reshape(B * C, 1, H + 2 * r, W + 2 * r), kernel_size=k)  # (B*C, k*k, H*W)
    return x.median(dim=1).values.reshape(B, C, H, W)


def spatial_joint_target(imgs: torch.Tensor, p: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The reference's ``spatial`` reduction: (B, C, H, W) -> (B, N, C) per-band patch means,
    normalised jointly over the patch's bands.

    The reference patchifies the p x p-upsampled means (every mean repeated p^2 times) and
    normalises that vector, so the variance is the unbiased one of the p^2 C repeats:
    p^2 sum_c (m_c - mu)^2 / (p^2 C - 1). For one band the target is zero.
    """
    m = patch_mean(imgs, p)  # (B, N, C)
    if not norm_pix:
        return m
    C = m.shape[-1]
    mu = m.mean(dim=-1, keepdim=True)
    var = (p * p) * (m - mu).pow(2).sum(dim=-1, keepdim=True) / (p * p * C - 1)
    return (m - mu) / (var + eps) ** 0.5


def _sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel responses of (B, 1, H, W) with reflect padding: kernel x [[1,0,-1],[2,0,-2],[1,0,-1]]
    and its transpose for y. -> gx, gy (B, H, W)."""
    sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=gray.device)
    weight = torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1).to(gray.dtype)  # (2,1,3,3)
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="reflect"), weight)  # (B,2,H,W)
    return g[:, 0], g[:, 1]


def _gaussian_window(size: int, std: float, H: int, W: int, like: torch.Tensor, normalise: bool) -> torch.Tensor:
    """A size x size Gaussian (std ``std``) tiled over (H, W) (cropped where H, W are not multiples)."""
    n = torch.arange(size, device=like.device, dtype=like.dtype) - (size - 1) / 2
    g1 = torch.exp(-0.5 * (n / std) ** 2)
    g2 = g1[:, None] * g1[None, :]
    if normalise:
        g2 = g2 / g2.sum()
    return g2.repeat(-(-H // size), -(-W // size))[:H, :W]


def hog_target(gray: torch.Tensor, p: int, norm_pix: bool = True, bins: int = HOG_BINS) -> torch.Tensor:
    """The reference's HOG target (MaskFeat's HOGLayerC): (B, 1, H, W) -> (B, N, bins p^2).

    Sobel gradients; orientation atan2(gx, gy) folded to [0, pi) and hard-binned into ``bins``;
    magnitudes weighted by a 16-px Gaussian window (std 8, sum 1) tiled over the image and
    summed per 8 x 8 cell; the (bins, H/8, W/8) histogram map is upsampled bilinearly to
    (bins, H, W) and patchified, then normalised per patch.
    """
    B, _, H, W = gray.shape
    gx, gy = _sobel(gray)
    mag = torch.sqrt(gx * gx + gy * gy) * _gaussian_window(HOG_WINDOW, HOG_WINDOW // 2, H, W, gray, True)
    idx = torch.floor(torch.atan2(gx, gy) / math.pi * bins).long() % bins  # (B, H, W)
    hist = torch.zeros(B, bins, H, W, device=gray.device, dtype=gray.dtype)
    hist.scatter_add_(1, idx.unsqueeze(1), mag.unsqueeze(1))
    hc, wc = H // HOG_CELL, W // HOG_CELL
    cells = hist[..., : hc * HOG_CELL, : wc * HOG_CELL].reshape(B, bins, hc, HOG_CELL, wc, HOG_CELL).sum(dim=(3, 5))
    up = F.interpolate(cells, size=(H, W), mode="bilinear", align_corners=False)  # (B, bins, H, W)
    return pixel_target(up, p, norm_pix)


def hog_cells_target(gray: torch.Tensor, p: int, bins: int = HOG_BINS) -> torch.Tensor:
    """codemae's compact HOG of a one-channel image: (B, 1, H, W) -> (B, N, 4 * bins).

    Sobel gradients, unsigned orientation (0..pi) hard-binned into ``bins``, magnitudes weighted
    by a Gaussian window of one patch (std p/2) and summed over 2 x 2 cells per patch; each
    patch's histogram is L2-normalised so targets do not depend on image contrast.
    """
    B, _, H, W = gray.shape
    gx, gy = _sobel(gray)
    mag = torch.sqrt(gx * gx + gy * gy)
    phase = torch.atan2(gy, gx) % math.pi  # unsigned orientation in [0, pi)
    idx = (phase / math.pi * bins).floor().long().clamp_(0, bins - 1)
    mag = mag * _gaussian_window(p, p / 2, H, W, gray, False)  # Gaussian window centred on each patch
    hist = torch.zeros(B, bins, H, W, device=gray.device, dtype=gray.dtype)
    hist.scatter_(1, idx.unsqueeze(1), mag.unsqueeze(1))
    cell = p // 2
    hist = F.avg_pool2d(hist, kernel_size=cell, stride=cell) * (cell * cell)  # (B,bins,2h,2w): sums
    h, w = H // p, W // p
    hist = hist.reshape(B, bins, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, 4 * bins)
    return F.normalize(hist, dim=-1, eps=1e-6)


def ratio_gradient(x: torch.Tensor, radii: Sequence[int] = SAR_GRADIENT_RADII) -> torch.Tensor:
    """Multi-scale ratio-of-averages gradient magnitude (SARATR-X): (B, 1, H, W) -> (B, S, H, W).

    At radius r, the horizontal gradient is log(mean of the left half-window / mean of the right
    half-window) over (2r+1) x (r+1) windows, likewise vertically; a ratio rather than a
    difference makes it insensitive to multiplicative speckle. ``x`` must be positive.
    """
    H, W = x.shape[-2:]
    outs = []
    for r in radii:
        r = min(r, H - 1, W - 1)  # reflect padding needs r < size
        xp = F.pad(x, (r, r, r, r), mode="reflect")
        # Half-window means as stride-1 box filters; the left window of pixel j starts at padded
        # column j, the right one at j + r (both r+1 wide), hence the two slices.
        horiz = F.avg_pool2d(xp, kernel_size=(2 * r + 1, r + 1), stride=1)  # (B,1,H,W+r)
        vert = F.avg_pool2d(xp, kernel_size=(r + 1, 2 * r + 1), stride=1)  # (B,1,H+r,W)
        gx = torch.log(horiz[..., :, :W] / horiz[..., :, r : r + W])
        gy = torch.log(vert[..., :H, :] / vert[..., r : r + H, :])
        outs.append(torch.sqrt(gx * gx + gy * gy))
    return torch.cat(outs, dim=1)


def target_dim(degradation: str, channels: int, p: int) -> int:
    """Values per patch of a degraded target for an image with ``channels`` bands."""
    return {
        "none": channels * p * p,
        "channel": p * p,
        "spatial": channels,
        "dual": 1,
        "hog": HOG_BINS * p * p,
        "sar_gradient": len(SAR_GRADIENT_RADII) * p * p,
        "median": channels * p * p,
        "spatial_mean": channels,
        "dual_mean": 1,
        "hog_cells": 4 * HOG_BINS,
    }[degradation]


def degraded_target(imgs: torch.Tensor, modality: str, degradation: str, p: int,
                    rgb_bands: Optional[Sequence[int]] = None, norm_pix: bool = True,
                    source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The CDR target of ``imgs`` (one modality): (B, C, H, W) -> (B, N, target_dim).

    ``source``: the same images at their source scale in [0, 1], used by ``hog`` and
    ``sar_gradient`` (default ``imgs`` clamped to [0, 1], for inputs already at that scale).
    """
    x = imgs.float()
    if degradation in SOURCE_DEGRADATIONS:
        src = (x if source is None else source.float()).clamp(0.0, 1.0)
        gray = one_channel(src, modality, rgb_bands)  # (B, 1, H, W)
        if degradation == "hog":
            return hog_target(gray, p, norm_pix)
        return pixel_target(ratio_gradient(gray + SAR_GRADIENT_OFFSET), p, norm_pix)
    if degradation == "none":
        return pixel_target(x, p, norm_pix)
    if degradation == "channel":
        return pixel_target(one_channel(x, modality, rgb_bands), p, norm_pix)
    if degradation == "spatial":
        return spatial_joint_target(x, p, norm_pix)
    if degradation == "dual":
        return spatial_joint_target(one_channel(x, modality, rgb_bands), p, norm_pix)
    if degradation == "median":
        return pixel_target(median_blur(x), p, norm_pix)
    if degradation == "spatial_mean":
        return patch_mean(x, p)
    if degradation == "dual_mean":
        return patch_mean(one_channel(x, modality, rgb_bands), p)
    if degradation == "hog_cells":
        return hog_cells_target(one_channel(x, modality, rgb_bands), p)
    raise ValueError(f"unknown degradation '{degradation}'")


@dataclass(frozen=True)
class LuminanceInput:
    """The optical bands of CDR's luminance 0.299R+0.587G+0.114B, and why."""

    bands: Optional[tuple[int, ...]]  # 0-based R, G, B; None: the band mean
    rule: str  # how they were chosen, as the start-up line says it
    source: str  # "explicit" (model.cdr.rgb_bands), else the RGB decision's source (data/raster.py)


def choose_luminance(optical_bands: int, rgb_bands: Optional[Sequence[int]],
                     rgb: Optional[RGBChoice] = None) -> LuminanceInput:
    """Which optical bands make CDR's luminance: ``rgb_bands`` (model.cdr.rgb_bands; an empty
    list: the band mean) when given; else red, green, blue of the run's one RGB decision
    (:func:`~codemae_cli.data.raster.choose_rgb`; without one, the decision on band order
    alone), except a guess among more than four bands (names that do not say): the band mean.
    So a 3-band or RGB+NIR image without telling names keeps its first three bands."""
    if rgb_bands is not None:
        return LuminanceInput(tuple(int(b) for b in rgb_bands) or None, "as model.cdr.rgb_bands says", "explicit")
    rgb = rgb if rgb is not None else choose_rgb([], optical_bands)
    if rgb.bands is None or (rgb.source == "first" and optical_bands > 4):
        return LuminanceInput(None, rgb.rule, rgb.source)
    return LuminanceInput(rgb.bands, rgb.rule, rgb.source)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only: pred/target (B, N, K), mask (B, N) 1 = hidden."""
    loss = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    return (loss * mask).sum() / mask.sum().clamp_min(1)
