"""Sliding-window layout and tapered blending weights for whole-scene prediction.

A scene of ``length`` pixels along one axis is covered by windows of ``window`` pixels that
step by ``stride = window - overlap``; the last window is snapped to the scene edge so that
every window lies fully inside the (possibly padded) scene. A scene shorter than one window is
padded up to the window (the caller reflects the pixels, then crops the prediction).

Blending: each window's probabilities are multiplied by a separable weight that ramps up
over the overlap with a raised cosine and is flat in the middle. The ramp never reaches zero
(a small floor), and a side of a window that lies on the scene border is not tapered at all:
border pixels are seen by a single window, and down-weighting them would only add noise to the
division by the weight sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from codemae_cli.errors import UserError

#: Smallest blending weight; keeps every covered pixel's weight sum strictly positive.
WEIGHT_FLOOR = 0.01


def resolve_overlap(window: int, overlap: float | int) -> int:
    """Overlap in pixels: a fraction in [0, 1) of the window, or a pixel count below it."""
    if window < 1:
        raise UserError(f"the window must be at least 1 pixel, not {window}")
    if isinstance(overlap, float) and 0.0 < overlap < 1.0:
        px = int(round(overlap * window))
    elif isinstance(overlap, float) and not overlap.is_integer():
        raise UserError(f"the overlap must be a fraction in [0, 1) or a whole number of pixels, not {overlap}")
    else:
        px = int(overlap)
    if px < 0 or px >= window:
        raise UserError(f"the overlap must be at least 0 and smaller than the window ({window} px), not {px}")
    return px


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, max(length, window))``; the last one snapped to the edge."""
    if stride < 1:
        raise ValueError("stride must be at least 1")
    span = max(length, window)  # a short scene is padded up to one window
    starts = list(range(0, span - window + 1, stride))
    if starts[-1] + window < span:
        starts.append(span - window)  # snap: no window hangs over the edge
    return starts


def ramp(window: int, overlap: int, taper_start: bool, taper_end: bool, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """1-D blending weight of one window: raised-cosine ramps of ``overlap`` px, flat elsewhere.

    ``taper_start``/``taper_end`` say whether that end of the window lies inside the scene
    (tapered) or on the scene border (flat, weight 1).
    """
    w = np.ones(window, dtype=np.float32)
    n = min(overlap, window // 2)
    if n > 0:
        # (i + 0.5) / n samples the ramp at pixel centres, so it is strictly between floor and 1
        t = (np.arange(n, dtype=np.float64) + 0.5) / n
        up = floor + (1.0 - floor) * np.sin(0.5 * math.pi * t) ** 2
        if taper_start:
            w[:n] = up
        if taper_end:
            w[window - n :] = up[::-1]
    return w


@dataclass(frozen=True)
class Panel:
    """A column block of a scene: owns output columns ``[x0, x1)``; its windows span ``[p0, p1)``."""

    x0: int
    x1: int
    col_starts: list[int]  # global column starts of the windows that touch [x0, x1)
    p0: int  # first column any of those windows covers (accumulator column 0)
    p1: int  # one past the last (may exceed the width only for a scene narrower than a window)

    @property
    def span(self) -> int:
        return self.p1 - self.p0


@dataclass(frozen=True)
class WindowGrid:
    """Every window of a scene, in raster order, with the accumulator band it needs."""

    height: int  # scene size (unpadded)
    width: int
    window: int
    overlap: int

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    @property
    def padded_height(self) -> int:
        return max(self.height, self.window)

    @property
    def padded_width(self) -> int:
        return max(self.width, self.window)

    @property
    def row_starts(self) -> list[int]:
        return window_starts(self.height, self.window, self.stride)

    @property
    def col_starts(self) -> list[int]:
        return window_starts(self.width, self.window, self.stride)

    @property
    def band_rows(self) -> int:
        """Accumulator height: a batch may span two consecutive window rows, never three."""
        return min(self.padded_height, self.window + self.stride)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def panels(self, panel_width: int | None) -> list[Panel]:
        """Vertical panels (column blocks) that together cover the scene's columns once each.

        A panel owns output columns ``[x0, x1)`` and runs every window whose columns intersect them
        (``col_starts``), so each owned pixel gets exactly the windows it gets in one whole-width
        pass. Panel borders are placed at the centre of a window column: with an overlap of at most
        half a window only that one window column straddles a border and is computed twice.
        ``panel_width`` (pixels) bounds the owned width: a scene at most that wide is one panel
        (``None``: always one); a wider one gets at most ``panel_width // stride`` window columns
        per panel, in as few panels as that allows, with the columns shared out evenly (no narrow
        last panel that would run its straddling windows twice for a few columns).
        """
        cols = self.col_starts
        n = 1
        if panel_width is not None and self.width > panel_width:
            per = max(1, int(panel_width) // self.stride)
            n = -(-len(cols) // per)
        firsts = [round(k * len(cols) / n) for k in range(1, n)]  # first window column of panels 2..n
        bounds = [0, *(cols[j] + self.window // 2 for j in firsts), self.width]  # < width: the last window ends there
        out = []
        for x0, x1 in zip(bounds[:-1], bounds[1:], strict=True):
            pc = [c for c in cols if c < x1 and c + self.window > x0]
            out.append(Panel(x0, x1, pc, pc[0], pc[-1] + self.window))
        return out

    def weight_1d(self, start: int, length: int) -> np.ndarray:
        """Ramp for a window at ``start`` along an axis of ``length`` (padded) pixels."""
        return ramp(self.window, self.overlap, taper_start=start > 0, taper_end=start + self.window < length)


__all__ = ["WEIGHT_FLOOR", "Panel", "WindowGrid", "ramp", "resolve_overlap", "window_starts"]
