"""Per-band statistics of prepared chips and the one normaliser that applies them.

- :class:`RunningStats`: streaming, nodata-aware per-band mean/std (Chan et al. parallel
  update, float64). Chips are added one at a time, in the units they are STORED in (integer
  optical as its integer values, SAR in dB after its fixed-point rounding), so the stats describe exactly
  what a reader gets back; partial results from worker processes merge exactly.
- :class:`BandNorm`: ``(x - mean) / std`` per band, with one rule for bands whose std is zero,
  unknown or not finite (scale 1: such a band carries no signal to scale) and for unknown means
  (0). Training (data/dataset.py), prediction and the analyses all build it from the stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


class RunningStats:
    """Per-band count, mean and sum of squared deviations (M2)."""

    def __init__(self, bands: int):
        self.count = np.zeros(bands, dtype=np.float64)
        self.mean = np.zeros(bands, dtype=np.float64)
        self.m2 = np.zeros(bands, dtype=np.float64)

    def update(self, chip: np.ndarray, valid: Optional[np.ndarray] = None) -> None:
        """Add a (bands, h, w) chip of any numeric dtype.

        Invalid pixels are skipped: NaN values, and with ``valid`` ((h, w) bool) every band of
        the pixels where it is False (how integer chips mark nodata).
        """
        x = chip.reshape(chip.shape[0], -1)
        if valid is not None:
            ok = np.broadcast_to(valid.reshape(1, -1), x.shape)
            if np.issubdtype(x.dtype, np.floating):
                ok = ok & ~np.isnan(x)
        elif np.issubdtype(x.dtype, np.floating):
            ok = ~np.isnan(x)
        else:
            ok = None
        if ok is None or ok.all():
            n = np.full(x.shape[0], x.shape[1], dtype=np.float64)
            # Fast path (most chips): no masking, one float64 pass.
            d64 = x.astype(np.float64)
            mean = d64.mean(axis=1)
            d64 -= mean[:, None]
            m2 = np.einsum("ij,ij->i", d64, d64)
        else:
            n = ok.sum(axis=1).astype(np.float64)
            if not n.any():
                return
            x64 = np.where(ok, x.astype(np.float64), 0.0)  # float16/integer chips: sum in float64
            mean = np.where(n > 0, x64.sum(axis=1) / np.maximum(n, 1), 0.0)
            dev = np.where(ok, x64 - mean[:, None], 0.0)
            m2 = (dev * dev).sum(axis=1)
        self._combine(n, mean, m2)

    def _combine(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + n
        safe = np.maximum(total, 1)
        delta = mean - self.mean
        self.mean = np.where(total > 0, self.mean + delta * n / safe, 0.0)
        self.m2 = self.m2 + m2 + delta * delta * self.count * n / safe
        self.count = total

    def merge(self, other: RunningStats) -> RunningStats:
        self._combine(other.count, other.mean, other.m2)
        return self

    def result(self) -> dict:
        """{'mean': [...], 'std': [...], 'count': [...]} (population std; NaN for empty bands)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.count > 0, self.mean, np.nan)
            std = np.where(self.count > 0, np.sqrt(self.m2 / np.maximum(self.count, 1)), np.nan)
        return {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "count": [int(v) for v in self.count],
        }

    def to_meta(self) -> dict:
        """``{"mean": [...], "std": [...]}`` as metadata.json stores it (None for empty bands)."""
        r = self.result()
        return {k: [v if math.isfinite(v) else None for v in r[k]] for k in ("mean", "std")}


@dataclass(frozen=True)
class BandNorm:
    """Per-band affine normalisation ``(x - mean) * scale`` with ``scale = 1 / std``.

    Bands with a std that is zero, missing or not finite get std 1; bands with a missing
    mean get mean 0. Nodata (NaN) becomes 0 after normalisation, i.e. the band mean.
    """

    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32, 1 for constant or unknown bands

    @classmethod
    def from_stats(cls, stats: Optional[dict], bands: Optional[int] = None) -> BandNorm:
        """From ``{"mean": [...], "std": [...]}`` (one modality's stats); ``None``: identity
        over ``bands`` bands."""
        if stats is None:
            if bands is None:
                raise ValueError("identity normalisation needs the band count")
            return cls(np.zeros(bands, np.float32), np.ones(bands, np.float32))
        mean = np.array([np.nan if v is None else v for v in stats["mean"]], dtype=np.float32)
        std = np.array([np.nan if v is None else v for v in stats["std"]], dtype=np.float32)
        if mean.shape != std.shape:
            raise ValueError(f"{mean.size} means for {std.size} stds")
        mean = np.where(np.isfinite(mean), mean, np.float32(0)).astype(np.float32)
        # A constant band (std 0) would divide by zero; it carries no signal, so scale by 1.
        std = np.where(np.isfinite(std) & (std > 0), std, np.float32(1)).astype(np.float32)
        return cls(mean, std)

    @property
    def bands(self) -> int:
        return int(self.mean.size)

    @property
    def scale(self) -> np.ndarray:
        """``1 / std`` per band, (C,) float32 (what the loader multiplies by)."""
        return (np.float32(1) / self.std).astype(np.float32)

    def concat(self, other: BandNorm) -> BandNorm:
        return BandNorm(np.concatenate([self.mean, other.mean]), np.concatenate([self.std, other.std]))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(C, ...) stored values -> float32 z-scores, NaN/inf (nodata) -> 0."""
        shape = (-1,) + (1,) * (x.ndim - 1)
        z = (np.asarray(x, dtype=np.float32) - self.mean.reshape(shape)) * self.scale.reshape(shape)
        return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
