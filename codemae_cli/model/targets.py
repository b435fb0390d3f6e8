"""Reconstruction targets: patchify/unpatchify, per-patch normalisation, CDR degradations.

All functions take dataset-normalised images (B, C, H, W) and return per-patch targets
(B, N, K) in the patch order of the encoder (row-major over the (H/p, W/p) grid).

CDR degradations (what the cross decoder must predict of the OTHER modality):
  none          all bands, full resolution, per-patch normalised (msGFM-like baseline)  K = C p^2
  channel       one channel (optical luminance / band mean, SAR polarisation mean),
                per-patch normalised (the reference setting)                           K = p^2
  spatial       per-band patch mean                                                     K = C
  dual          patch mean of the one-channel image                                     K = 1
  hog           histogram of oriented gradients of the one-channel image, 2 x 2 cells
                per patch, 9 unsigned orientation bins, L2-normalised per patch         K = 36
  sar_gradient  multi-scale ratio gradients (SARATR-X; speckle-robust) of the
                one-channel image at half-window radii 9, 13, 17, per-patch normalised  K = 3 p^2
  median        5 x 5 median filter of all bands, per-patch normalised                  K = C p^2
Patch means (spatial, dual) are not normalised per patch: a per-patch normalisation of a
constant is zero (the reference code's "dual" target degenerates that way); the inputs are
already normalised per band with the dataset statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

LUMINANCE = (0.299, 0.587, 0.114)
DEGRADATIONS = ("none", "channel", "spatial", "dual", "hog", "sar_gradient", "median")
SAR_GRADIENT_RADII = (9, 13, 17)
HOG_BINS = 9


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
        r, g, b = (imgs[:, i : i + 1] for i in rgb_bands)
        return LUMINANCE[0] * r + LUMINANCE[1] * g + LUMINANCE[2] * b
    return imgs.mean(dim=1, keepdim=True)


def patch_mean(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C): the mean of every band over every patch."""
    return F.avg_pool2d(imgs, kernel_size=p, stride=p).flatten(2).transpose(1, 2)


def median_blur(imgs: torch.Tensor, k: int = 5) -> torch.Tensor:
    """k x k median filter per band with reflect padding."""
    B, C, H, W = imgs.shape
    r = k // 2
    x = F.pad(imgs, (r, r, r, r), mode="reflect")
    x = F.unfold(x.reshape(B * C, 1, H + 2 * r, W + 2 * r), kernel_size=k)  # (B*C, k*k, H*W)
    return x.median(dim=1).values.reshape(B, C, H, W)


def hog_target(gray: torch.Tensor, p: int, bins: int = HOG_BINS) -> torch.Tensor:
    """MaskFeat-style HOG of a one-channel image: (B, 1, H, W) -> (B, N, 4 * bins).

    Sobel gradients, unsigned orientation (0..pi) hard-binned into ``bins``, magnitudes weighted
    by a Gaussian window of one patch (std p/2) and summed over 2 x 2 cells per patch; each
    patch's histogram is L2-normalised so targets do not depend on image contrast.
    """
    B, _, H, W = gray.shape
    sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=gray.device)
    weight = torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1).to(gray.dtype)  # (2,1,3,3)
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="reflect"), weight)  # (B,2,H,W)
    gx, gy = g[:, 0], g[:, 1]
    mag = torch.sqrt(gx * gx + gy * gy)
    phase = torch.atan2(gy, gx) % math.pi  # unsigned orientation in [0, pi)
    idx = (phase / math.pi * bins).floor().long().clamp_(0, bins - 1)
    # Gaussian window centred on each patch.
    n = torch.arange(p, device=gray.device, dtype=gray.dtype) - (p - 1) / 2
    g1 = torch.exp(-0.5 * (n / (p / 2)) ** 2)
    window = (g1[:, None] * g1[None, :]).repeat(H // p, W // p)  # (H, W)
    mag = mag * window
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


def _positive(x: torch.Tensor, offset: float = 1e-2) -> torch.Tensor:
    """Per-image min-max stretch to [offset, 1 + offset]: ratio gradients need positive values."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6) + offset


def target_dim(degradation: str, channels: int, p: int) -> int:
    """Values per patch of a degraded target for an image with ``channels`` bands."""
    return {
        "none": channels * p * p,
        "channel": p * p,
        "spatial": channels,
        "dual": 1,
        "hog": 4 * HOG_BINS,
        "sar_gradient": len(SAR_GRADIENT_RADII) * p * p,
        "median": channels * p * p,
    }[degradation]


def degraded_target(imgs: torch.Tensor, modality: str, degradation: str, p: int,
                    rgb_bands: Optional[Sequence[int]] = None, norm_pix: bool = True) -> torch.Tensor:
    """The CDR target of ``imgs`` (one modality): (B, C, H, W) -> (B, N, target_dim)."""
    x = imgs.float()
    if degradation == "none":
        return pixel_target(x, p, norm_pix)
    if degradation == "channel":
        return pixel_target(one_channel(x, modality, rgb_bands), p, norm_pix)
    if degradation == "spatial":
        return patch_mean(x, p)
    if degradation == "dual":
        return patch_mean(one_channel(x, modality, rgb_bands), p)
    if degradation == "hog":
        return hog_target(one_channel(x, modality, rgb_bands), p)
    if degradation == "sar_gradient":
        grad = ratio_gradient(_positive(one_channel(x, modality, rgb_bands)))
        return pixel_target(grad, p, norm_pix)
    if degradation == "median":
        return pixel_target(median_blur(x), p, norm_pix)
    raise ValueError(f"unknown degradation '{degradation}'")


def default_rgb_bands(optical_bands: int, rgb_bands: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    """Which optical bands make the luminance: explicit list, else the first three of a 3- or
    4-band (RGB / RGB+NIR) image, else none (band mean)."""
    if rgb_bands is not None:
        return tuple(rgb_bands) or None
    return (0, 1, 2) if optical_bands in (3, 4) else None


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only: pred/target (B, N, K), mask (B, N) 1 = hidden."""
    loss = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    return (loss * mask).sum() / mask.sum().clamp_min(1)
