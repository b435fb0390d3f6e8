"""Tapered blending of window probabilities over an open band of rows.

    acc = BandAccumulator(layout, device)
    acc.start_panel(panel)                 # an empty band over the panel's window span
    acc.place_valid(strip.row, strip.valid)
    acc.add(probs, windows)                # probs (B, K, window, window), weighted by the taper
    rows = acc.finish(upto)                # rows [top, upto) are final: FinishedRows, band slides

The band holds ``window + stride`` rows of the panel's window span (a batch holds windows of at
most two consecutive window rows), so memory is bounded by a band of a panel, never by the scene.
Every window row holds the same column windows, so the weight sum is separable:
``sum_r sum_c wy_r(y) wx_c(x) = Wy(y) * Wx(x)``: two 1-D vectors instead of a band-sized buffer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinishedRows:
    """Final rows of a panel: blended probabilities and input validity, for the writer."""

    row: int  # first scene row
    col: int  # first scene column (the panel's x0)
    probs: object  # (K, rows, cols) float32 tensor, sums to 1 per pixel
    valid: object  # (rows, cols) bool tensor


class BandAccumulator:
    """Weighted probability sums of the open rows of one panel, and their input validity."""

    def __init__(self, layout, device, instrument=None):
        import torch

        self.layout = layout
        self.device = device
        self.instrument = instrument
        self.band = layout.band_rows
        hp, wp, win = layout.padded_height, layout.padded_width, layout.window
        self._wy = {r: torch.from_numpy(layout.weight_1d(r, hp)).to(device) for r in layout.row_starts}
        self._wx = {c: torch.from_numpy(layout.weight_1d(c, wp)).to(device) for c in layout.col_starts}
        self.wy_sum = torch.zeros(hp, dtype=torch.float32, device=device)
        self.wx_sum = torch.zeros(wp, dtype=torch.float32, device=device)
        for r, w in self._wy.items():
            self.wy_sum[r : r + win] += w
        for c, w in self._wx.items():
            self.wx_sum[c : c + win] += w
        self._w2: dict = {}  # 2-D tapers by (row start, column start) type: at most 3 x 3 distinct ones
        self.classes: int | None = None
        self.acc = None  # (K, band, span) weighted probability sums
        self._spare = None  # a second band: sliding copies into it instead of onto itself
        self._product = None  # (K, window, window): one window's weighted probabilities
        self.valid = None  # (band, span) bool
        self.panel = None
        self.top = 0

    def start_panel(self, panel) -> None:
        """An empty band at the top of ``panel``."""
        import torch

        self.panel = panel
        self.top = 0
        self.valid = torch.zeros(self.band, panel.span, dtype=torch.bool, device=self.device)
        if self.acc is not None and self.acc.shape[2] == panel.span:
            self.acc.zero_()
        elif self.classes is not None:
            self.allocate(self.classes)

    def allocate(self, classes: int) -> None:
        """Sums for ``classes`` classes over the band (known once the model has answered)."""
        import torch

        self.classes = classes
        self.acc = self._spare = None  # free the previous panel's band before allocating this one
        shape = (classes, self.band, self.panel.span)
        self.acc = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._spare = torch.empty(shape, dtype=torch.float32, device=self.device)
        self._product = torch.empty(classes, self.layout.window, self.layout.window, dtype=torch.float32,
                                    device=self.device)
        if self.instrument is not None:
            self.instrument.acc_cols = max(self.instrument.acc_cols, self.panel.span)

    def place_valid(self, row: int, valid) -> None:
        """A strip's validity into the band (rows shared with the previous strip are overwritten)."""
        off = row - self.top
        self.valid[off : off + self.layout.window] = valid

    def add(self, probs, windows) -> None:
        """Add each window's probabilities (B, K, window, window) times its taper at (row, col)."""
        import torch

        win, p0 = self.layout.window, self.panel.p0
        st = self.instrument
        for i, (r, c) in enumerate(windows):
            off, x = r - self.top, c - p0
            if st is not None:
                st.max_open_rows = max(st.max_open_rows, off + win)
                st.max_open_cols = max(st.max_open_cols, x + win)
            if off + win > self.band or x < 0 or x + win > self.acc.shape[2]:  # never: batching/panel rules
                raise RuntimeError("window outside the open band of the panel")
            # product into a reused buffer, then add: the same rounding as ``+= p * w``, no allocation
            torch.mul(probs[i], self._taper(r, c), out=self._product)
            self.acc[:, off : off + win, x : x + win] += self._product

    def _taper(self, r: int, c: int):
        """Separable (window, window) weight; it depends only on which sides touch the scene border."""
        win, lay = self.layout.window, self.layout
        key = (r > 0, r + win < lay.padded_height, c > 0, c + win < lay.padded_width)
        w2 = self._w2.get(key)
        if w2 is None:
            w2 = self._w2[key] = self._wy[r][:, None] * self._wx[c][None, :]
        return w2

    def finish(self, upto: int) -> FinishedRows | None:
        """Rows [top, upto) are final: normalise them by the weight sum, then slide the band down.

        Returns None when no scene row is finished (padding below a short scene is never written).
        """
        lay, pn = self.layout, self.panel
        upto = min(upto, lay.padded_height)
        n = upto - self.top
        if n <= 0:
            return None
        m = min(upto, lay.height) - self.top
        done = None
        if m > 0 and self.acc is not None:
            a0, a1 = pn.x0 - pn.p0, pn.x1 - pn.p0  # the panel's own columns in the band
            wts = self.wy_sum[self.top : self.top + m, None] * self.wx_sum[None, pn.x0 : pn.x1]  # > 0 everywhere
            done = FinishedRows(self.top, pn.x0, self.acc[:, :m, a0:a1] / wts, self.valid[:m, a0:a1].clone())
            if self.instrument is not None:
                self.instrument.rows_written += m
                self.instrument.flushes.append((self.top, m))
        self._slide(n)
        self.top = upto
        return done

    def _slide(self, n: int) -> None:
        """Rows [n, band) move to the top, the rest is cleared (into the spare band: no overlapping copy)."""
        keep = max(self.band - n, 0)
        if self.acc is not None:
            if keep:
                self._spare[:, :keep] = self.acc[:, n:]
            self._spare[:, keep:] = 0
            self.acc, self._spare = self._spare, self.acc
        if keep:
            self.valid[:keep] = self.valid[n:].clone()
        self.valid[keep:] = False


__all__ = ["BandAccumulator", "FinishedRows"]
