"""Streaming, nodata-aware per-band mean/std (Chan et al. parallel update, float64).

Chips are added one at a time (NaN = nodata, ignored); partial results from worker processes
are merged exactly, so the result equals a direct computation over all valid train pixels.
"""

from __future__ import annotations

import numpy as np


class RunningStats:
    """Per-band count, mean and sum of squared deviations (M2)."""

    def __init__(self, bands: int):
        self.count = np.zeros(bands, dtype=np.float64)
        self.mean = np.zeros(bands, dtype=np.float64)
        self.m2 = np.zeros(bands, dtype=np.float64)

    def update(self, chip: np.ndarray) -> None:
        """Add a (bands, h, w) chip; NaN values are skipped."""
        x = chip.reshape(chip.shape[0], -1)
        ok = ~np.isnan(x)
        if ok.all():
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
            x64 = np.where(ok, x, 0.0)
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
