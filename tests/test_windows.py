"""Window layout and blending weights of whole-scene prediction."""

from __future__ import annotations

import numpy as np
import pytest

from codemae_cli.errors import UserError
from codemae_cli.infer.windows import WEIGHT_FLOOR, WindowGrid, ramp, resolve_overlap, window_starts


@pytest.mark.parametrize("length,window,stride", [(1000, 256, 192), (256, 256, 192), (257, 256, 192), (999, 64, 1)])
def test_windows_cover_the_scene_and_the_last_is_snapped(length, window, stride):
    starts = window_starts(length, window, stride)
    assert starts[0] == 0
    assert starts[-1] + window == length  # snapped to the edge, never beyond
    assert all(b - a <= stride for a, b in zip(starts[:-1], starts[1:], strict=True))  # no gaps
    assert starts == sorted(set(starts))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()


def test_scene_shorter_than_a_window_gets_one_padded_window():
    assert window_starts(37, 64, 48) == [0]
    g = WindowGrid(23, 37, 64, 16)
    assert (g.padded_height, g.padded_width, len(g)) == (64, 64, 1)
    assert g.band_rows == 64  # never more rows than the padded scene


def test_ramp_tapers_inside_and_stays_flat_on_the_scene_border():
    w = ramp(64, 16, taper_start=True, taper_end=True)
    assert w.dtype == np.float32 and w.shape == (64,)
    assert (w > 0).all() and w.min() >= WEIGHT_FLOOR
    assert np.allclose(w, w[::-1])
    assert np.all(np.diff(w[:16]) > 0) and np.all(w[16:48] == 1)
    border = ramp(64, 16, taper_start=False, taper_end=True)
    assert np.all(border[:48] == 1) and border[-1] < 0.1
    assert np.all(ramp(64, 0, True, True) == 1)
    # overlap wider than half the window: ramps are limited to half the window each
    assert ramp(64, 48, True, True).shape == (64,)


def test_grid_weights_know_which_side_is_the_border():
    g = WindowGrid(300, 300, 128, 32)
    first, last = g.row_starts[0], g.row_starts[-1]
    assert g.weight_1d(first, g.padded_height)[0] == 1.0
    assert g.weight_1d(last, g.padded_height)[-1] == 1.0
    assert g.weight_1d(last, g.padded_height)[0] < 0.1
    assert g.band_rows == 128 + 96


def test_resolve_overlap():
    assert resolve_overlap(256, 64) == 64
    assert resolve_overlap(256, 0.25) == 64
    assert resolve_overlap(256, 0) == 0
    assert resolve_overlap(256, 64.0) == 64
    for bad in (256, -1, 300, 1.5):
        with pytest.raises(UserError):
            resolve_overlap(256, bad)


@pytest.mark.parametrize("width,panel_width", [(4096, 4096), (4096, 8192), (8000, 4096), (20000, 8192), (600, 48),
                                               (150, 30)])
def test_panels_tile_the_width_evenly_within_the_panel_width(width, panel_width):
    """A scene at most a panel wide is one panel (no window runs twice); a wider one is cut into
    the fewest panels of at most ``panel_width // stride`` window columns, shared out evenly."""
    window, overlap = (512, 128) if width > 1000 else (32, 8)
    grid = WindowGrid(64, width, window, overlap)
    panels = grid.panels(panel_width)
    assert [p.x0 for p in panels] == [0] + [p.x1 for p in panels[:-1]] and panels[-1].x1 == width
    per = max(1, panel_width // grid.stride)
    if width <= panel_width:
        assert len(panels) == 1 and panels[0].col_starts == grid.col_starts
        return
    counts = [len(p.col_starts) for p in panels]
    # each panel runs its own window columns plus at most one straddling column on each side
    owned = [sum(1 for c in p.col_starts if p.x0 <= c + window // 2 < p.x1) for p in panels]
    assert sum(owned) == len(grid.col_starts) and max(owned) <= per
    assert len(panels) == -(-len(grid.col_starts) // per)  # as few panels as the bound allows
    assert max(owned) - min(owned) <= 1  # shared out evenly: no narrow last panel
    assert all(n <= o + 2 for n, o in zip(counts, owned, strict=True))
    # every window column touching a panel's columns runs in that panel
    for p in panels:
        assert p.col_starts == [c for c in grid.col_starts if c < p.x1 and c + window > p.x0]


def test_panels_none_is_one_panel():
    grid = WindowGrid(64, 10000, 512, 64)
    assert len(grid.panels(None)) == 1
