"""Quick-look PNG of a prepared dataset: per scene, a decimated mosaic of its kept chips
(optical | SAR | labels) with each chip outlined in its split's colour.

The mosaic is read from the dataset's own shards with strided (decimated) reads, about
``size`` pixels across per scene, so it shows exactly what the loader will serve (SAR after
warping and dB conversion, dropped areas black) and costs a small fraction of ``prepare``:
no GeoTIFF is read again and no plotting library is imported.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SPLIT_COLOURS = {"train": (60, 200, 75), "val": (255, 200, 0), "test": (240, 50, 230)}
_LABEL_COLOURS = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)],
                          dtype=np.uint8)
_GAP = 6  # pixels between panels


def _rgb_bands(root, meta: dict, count: int) -> list[int]:
    """The bands shown as red, green, blue: the one RGB decision (data/raster.py choose_rgb, as the
    OKD teacher and CDR's luminance read them); one or two bands: the first, as grey."""
    from codemae_cli.data.raster import choose_rgb

    rgb = choose_rgb([(str(root), meta)], count).bands
    return list(rgb) if rgb is not None else [0]


def _stretch(img: np.ndarray) -> np.ndarray:
    """(C, h, w) float with NaN -> uint8 (h, w, C), 2-98 % percentile stretch per band; NaN -> 0."""
    out = np.zeros(img.shape[1:] + (img.shape[0],), dtype=np.uint8)
    for b, band in enumerate(img):
        ok = np.isfinite(band)
        if not ok.any():
            continue
        lo, hi = np.percentile(band[ok], [2, 98])
        scaled = (band - lo) / (hi - lo if hi > lo else 1.0)
        out[..., b] = (np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1) * 255).astype(np.uint8)
    return out


class _Mosaic:
    """Decimated canvases of one scene: every ``step``-th pixel of the reference grid."""

    def __init__(self, ds, rows: np.ndarray, size: int, bands: list[int]):
        # Plain numpy columns: a GeoDataFrame lookup per chip costs more than its read.
        self.row = ds.index["row"].to_numpy(dtype=np.int64)
        self.col = ds.index["col"].to_numpy(dtype=np.int64)
        self.split = ds.index["split"].astype(str).to_numpy()
        self.r0, self.c0 = int(self.row[rows].min()), int(self.col[rows].min())
        T = ds.tile
        height = int(self.row[rows].max()) + T - self.r0
        width = int(self.col[rows].max()) + T - self.c0
        self.step = max(1, math.ceil(max(height, width) / size))
        self.shape = (math.ceil(height / self.step), math.ceil(width / self.step))
        self.ds, self.rows, self.bands, self.tile = ds, rows, bands, T

    def _read(self, i: int) -> tuple[dict, int, int]:
        """Chip ``i`` sampled on the scene's decimated lattice, and where it goes on the canvas."""
        row, col = int(self.row[i]), int(self.col[i])
        s = self.step
        fr, fc = (-(row - self.r0)) % s, (-(col - self.c0)) % s  # first sampled pixel in the chip
        chip = self.ds.read(i, slice(fr, None, s), slice(fc, None, s))
        return chip, (row - self.r0 + fr) // s, (col - self.c0 + fc) // s

    def panels(self) -> list[np.ndarray]:
        """[optical RGB, SAR (first band), labels] as (h, w, 3) uint8 with split outlines."""
        ds, (h, w) = self.ds, self.shape
        opt = np.full((len(self.bands), h, w), np.nan, np.float32)
        sar = np.full((1, h, w), np.nan, np.float32)
        lab = np.full((h, w), 255, np.uint8) if ds.has_labels else None
        for i in self.rows:
            chip, y, x = self._read(int(i))
            ch, cw = chip["sar"].shape[-2:]
            opt[:, y:y + ch, x:x + cw] = chip["optical"][self.bands]
            sar[:, y:y + ch, x:x + cw] = chip["sar"][:1]
            if lab is not None:
                lab[y:y + ch, x:x + cw] = chip["label"]
        out = [_stretch(opt), np.repeat(_stretch(sar), 3, axis=-1)]
        if lab is not None:
            colours = np.zeros((256, 3), np.uint8)
            colours[:255] = _LABEL_COLOURS[np.arange(255) % len(_LABEL_COLOURS)]
            out.append(colours[lab])
        if out[0].shape[-1] == 1:
            out[0] = np.repeat(out[0], 3, axis=-1)
        for panel in out:
            for i in self.rows:
                self._outline(panel, int(i))
        return out

    def _outline(self, panel: np.ndarray, i: int) -> None:
        s = self.step
        y0 = (int(self.row[i]) - self.r0) // s
        x0 = (int(self.col[i]) - self.c0) // s
        y1 = min(panel.shape[0], y0 + math.ceil(self.tile / s)) - 1
        x1 = min(panel.shape[1], x0 + math.ceil(self.tile / s)) - 1
        colour = SPLIT_COLOURS.get(str(self.split[i]), (255, 255, 255))
        panel[y0, x0:x1 + 1] = panel[y1, x0:x1 + 1] = colour
        panel[y0:y1 + 1, x0] = panel[y0:y1 + 1, x1] = colour


def write_quicklook(root: str | Path, path: str | Path, size: int = 384, max_scenes: int = 4) -> Path:
    """Write the quick-look of the dataset at ``root`` (first ``max_scenes`` scenes, about
    ``size`` px per panel) to ``path`` as PNG; returns ``path``."""
    from PIL import Image

    from codemae_cli.data.shards import PreparedDataset

    ds = PreparedDataset(root)
    bands = _rgb_bands(root, ds.meta, ds.layout.optical_bands)
    scene_col = ds.index["scene_id"].astype(str).to_numpy() if "scene_id" in ds.index else np.zeros(len(ds), str)
    rows = []
    for scene in list(dict.fromkeys(scene_col))[:max_scenes]:
        panels = _Mosaic(ds, np.flatnonzero(scene_col == scene), size, bands).panels()
        zoom = max(1, size // max(panels[0].shape[:2]))  # small scenes: whole pixels, enlarged
        panels = [p.repeat(zoom, axis=0).repeat(zoom, axis=1) for p in panels]
        gap = np.zeros((panels[0].shape[0], _GAP, 3), np.uint8)
        rows.append(np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, _GAP), (0, width - r.shape[1]), (0, 0))) for r in rows]
    out = Path(path)
    # Fast zlib level: the default level costs more than everything else here for a few % size.
    Image.fromarray(np.concatenate(rows, axis=0)[:-_GAP]).save(out, format="PNG", compress_level=1)
    return out
