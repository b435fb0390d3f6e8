"""Tapered blending of window probabilities over the open rows of a panel.

    acc = BandAccumulator(layout, device)
    acc.start_panel(panel)                 # nothing open yet
    acc.place_valid(strip.row, strip.valid)
    acc.add(probs, windows)                # probs (B, K, window, window), weighted by the taper
    for rows in acc.finish(upto):          # rows above ``upto`` are final: FinishedRows, for the writer
        ...

The rows of a panel are cut into segments between consecutive window-row starts
(``[rows[i], rows[i + 1])``, the last one ``[rows[-1], height)``); a window adds into every
segment it covers. A segment is finished once a batch starts at a later window row (a batch
holds windows of at most two consecutive window rows, so at most ``window + stride`` rows are
open), and its buffer is handed to the writer as it is: no band slides or is copied, and the
division by the weight sum happens in the writer's thread. Memory is bounded by a few segments
of a panel, never by the scene. Every window row holds the same column windows, so the weight sum
is separable: ``sum_r sum_c wy_r(y) wx_c(x) = Wy(y) * Wx(x)``: two 1-D vectors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinishedRows:
    """Final rows of a panel: weighted probability sums, their weight sums and input validity."""

    row: int  # first scene row
    col: int  # first scene column (the panel's x0)
    sums: object  # (K, rows, cols) float32 tensor: weighted probability sums
    weights: object  # (rows, cols) float32 tensor, > 0 everywhere
    valid: object  # (rows, cols) bool tensor

    def probs(self):
        """Blended probabilities (K, rows, cols); they sum to 1 per pixel."""
        return self.sums / self.weights


@dataclass
class _Segment:
    start: int  # first row (padded scene)
    end: int  # one past the last row
    sums: object  # (K, end - start, span), None until the class count is known
    valid: object  # (end - start, span) bool


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
        rows = layout.row_starts
        self._bounds = list(zip(rows, [*rows[1:], hp], strict=True))  # segment i: rows [start, end)
        self._w2: dict = {}  # 2-D tapers by (row start, column start) type: at most 3 x 3 distinct ones
        self.classes: int | None = None
        self._product = None  # (K, window, window): one window's weighted probabilities
        self.open: dict[int, _Segment] = {}  # segment index -> open segment
        self.panel = None
        self.top = 0  # first row not yet finished

    def start_panel(self, panel) -> None:
        """Nothing open, at the top of ``panel``."""
        self.panel = panel
        self.top = 0
        self.open = {}
        if self.instrument is not None and self.classes is not None:
            self.instrument.acc_cols = max(self.instrument.acc_cols, panel.span)

    def allocate(self, classes: int) -> None:
        """Sums for ``classes`` classes (known once the model has answered) in the open segments."""
        import torch

        self.classes = classes
        self._product = torch.empty(classes, self.layout.window, self.layout.window, dtype=torch.float32,
                                    device=self.device)
        for seg in self.open.values():
            seg.sums = self._zeros(classes, seg.end - seg.start)
        if self.instrument is not None:
            self.instrument.acc_cols = max(self.instrument.acc_cols, self.panel.span)

    def _zeros(self, *shape, dtype=None):
        import torch

        return torch.zeros(*shape, self.panel.span, dtype=dtype or torch.float32, device=self.device)

    def _segments(self, row: int):
        """The open segments that rows ``[row, row + window)`` cover (opened on first use), with
        the slice of those rows each one holds."""
        import torch

        end = row + self.layout.window
        for i, (s0, s1) in enumerate(self._bounds):
            if s1 <= row or s0 >= end:
                continue
            seg = self.open.get(i)
            if seg is None:
                sums = self._zeros(self.classes, s1 - s0) if self.classes is not None else None
                seg = self.open[i] = _Segment(s0, s1, sums, self._zeros(s1 - s0, dtype=torch.bool))
                if self.instrument is not None:
                    rows = sum(g.end - g.start for g in self.open.values())
                    self.instrument.max_alloc_rows = max(self.instrument.max_alloc_rows, rows)
            lo, hi = max(s0, row), min(s1, end)
            yield seg, slice(lo - s0, hi - s0), slice(lo - row, hi - row)

    def place_valid(self, row: int, valid) -> None:
        """A strip's validity (window rows) into the open segments (rows shared with the previous
        strip are overwritten)."""
        for seg, dst, src in self._segments(row):
            seg.valid[dst] = valid[src]

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
            if off < 0 or off + win > self.band or x < 0 or x + win > self.panel.span:  # never: batching rules
                raise RuntimeError("window outside the open rows of the panel")
            # product into a reused buffer, then add: the same rounding as ``+= p * w``, no allocation
            torch.mul(probs[i], self._taper(r, c), out=self._product)
            for seg, dst, src in self._segments(r):
                seg.sums[:, dst, x : x + win] += self._product[:, src]

    def _taper(self, r: int, c: int):
        """Separable (window, window) weight; it depends only on which sides touch the scene border."""
        win, lay = self.layout.window, self.layout
        key = (r > 0, r + win < lay.padded_height, c > 0, c + win < lay.padded_width)
        w2 = self._w2.get(key)
        if w2 is None:
            w2 = self._w2[key] = self._wy[r][:, None] * self._wx[c][None, :]
        return w2

    def finish(self, upto: int) -> list[FinishedRows]:
        """Rows above ``upto`` are final: the open segments that end there, in order, as FinishedRows
        of the panel's own columns (padding below a short scene is dropped, never written)."""
        lay, pn = self.layout, self.panel
        upto = min(upto, lay.padded_height)
        done = []
        for i in sorted(self.open):
            seg = self.open[i]
            if seg.end > upto:
                break
            del self.open[i]
            m = min(seg.end, lay.height) - seg.start
            if m > 0 and seg.sums is not None:
                a0, a1 = pn.x0 - pn.p0, pn.x1 - pn.p0  # the panel's own columns in the segment
                wts = self.wy_sum[seg.start : seg.start + m, None] * self.wx_sum[None, pn.x0 : pn.x1]
                done.append(FinishedRows(seg.start, pn.x0, seg.sums[:, :m, a0:a1], wts, seg.valid[:m, a0:a1]))
                if self.instrument is not None:
                    self.instrument.rows_written += m
                    self.instrument.flushes.append((seg.start, m))
        self.top = max(self.top, upto)
        return done


__all__ = ["BandAccumulator", "FinishedRows"]
