"""Writing finished rows: class map (and probabilities) into temporary tiled GeoTIFFs, off the model's thread.

    writer = PredictionWriter(out, grid, temps, nodata=255, tags=tags, class_names=names)
    writer.open_probabilities(prob_out, k, "uint8")   # optional, once the class count is known
    writer.put(finished_rows)                          # queued; a writer thread does the rest
    counts = writer.close()                            # pixels per class id (256 bins)

For each :class:`~codemae_cli.infer.blend.FinishedRows` the writer thread divides the weighted
sums by the weight sums, builds the class map (:func:`class_map`), masks invalid input pixels
with nodata, counts pixels per class and writes the rows with a windowed write; with
probabilities it also writes them (uint8 ``p * 254`` or float32). The thread is a
:class:`~codemae_cli.infer.stage.Stage`: at most a few bands of rows wait in memory, nothing
upstream waits for GDAL, and an error in the thread is raised again by the next ``put`` or ``close``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from codemae_cli.infer.cog import TiledWriter, temp_sibling
from codemae_cli.infer.stage import Stage

#: Probabilities written as uint8 are ``round(p * PROB_SCALE)``; 255 stays free for nodata.
PROB_SCALE = 254

#: Finished bands waiting for the writer thread at most (each is K x rows x panel columns floats).
QUEUE_BANDS = 2


def class_map(probs):
    """(K, h, w) probabilities -> (h, w) uint8 class ids: the first largest class, like ``argmax(0)``.

    A running pairwise maximum over the classes reads each class plane once, contiguously;
    ``argmax(dim=0)`` over a channel-first block strides across planes and is several times slower.
    """
    import torch

    best = probs[0].clone()
    cls = torch.zeros(best.shape, dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        better = probs[k] > best  # strict: ties keep the lower class id, as argmax does
        cls.masked_fill_(better, k)
        torch.maximum(best, probs[k], out=best)
    return cls


def colormap(class_colors) -> dict | None:
    """Class colours (``"#rrggbb"`` or ``[r, g, b]``, None to skip) as a GDAL colour table."""
    if not class_colors:
        return None
    cmap = {}
    for i, color in enumerate(class_colors):
        if color is None:
            continue
        if isinstance(color, str):
            c = color.lstrip("#")
            if len(c) != 6:
                continue
            rgb = tuple(int(c[k : k + 2], 16) for k in (0, 2, 4))
        else:
            rgb = tuple(int(v) for v in list(color)[:3])
        cmap[i] = (*rgb, 255)
    return cmap or None


class PredictionWriter:
    """The temporary class-map (and probability) GeoTIFFs of one prediction, fed by a writer thread."""

    def __init__(self, out: Path, grid, temps: list[Path], *, nodata: int, tags: dict | None = None,
                 class_names: list[str] | None = None, class_colors: list | None = None):
        self.grid = grid
        self.nodata = nodata
        self.class_names = list(class_names) if class_names else None
        self.tags = {"codemae_product": "class_map", "nodata": nodata, **(tags or {})}
        if class_names:
            self.tags["class_names"] = json.dumps(list(class_names))
        self.temp_paths = temps  # every temporary file is added here first, for the caller to remove
        self.class_tmp = self._temp(out)
        self._cls = TiledWriter(self.class_tmp, grid, 1, "uint8", nodata, tags=self.tags, descriptions=["class"],
                                colormap=colormap(class_colors))
        self._prob = None
        self.prob_tmp: Path | None = None
        self.prob_dtype = "uint8"
        self.counts = np.zeros(256, dtype=np.int64)
        self._stage = Stage("codemae-write", depth=QUEUE_BANDS)

    def _temp(self, path: Path) -> Path:
        tmp = temp_sibling(path, ".part.tif")
        self.temp_paths.append(tmp)
        return tmp

    def open_probabilities(self, path: Path, classes: int, dtype: str) -> None:
        """Also write the class probabilities (``classes`` bands, uint8 scaled by 1/254 or float32)."""
        self.prob_tmp = self._temp(path)
        self.prob_dtype = dtype
        names = self.class_names or [str(i) for i in range(classes)]
        tags = dict(self.tags, codemae_product="class_probabilities")
        desc = [f"p_{n}" for n in names]
        if dtype == "uint8":
            tags["scale"] = f"1/{PROB_SCALE}"
            self._prob = TiledWriter(self.prob_tmp, self.grid, classes, "uint8", 255, tags=tags, descriptions=desc,
                                     scales=[1.0 / PROB_SCALE] * classes)
        else:
            self._prob = TiledWriter(self.prob_tmp, self.grid, classes, "float32", float("nan"), tags=tags,
                                     descriptions=desc)

    def put(self, rows) -> None:
        """Queue finished rows (None is ignored); waits while the queue is full."""
        if rows is not None:
            self._stage.submit(self._write, rows)

    def close(self) -> np.ndarray:
        """Write what is queued, close the files; the pixels per class id (256 bins)."""
        self._stage.close()
        self._close_files()
        return self.counts

    def abort(self) -> None:
        """Stop after an error elsewhere: drop what is queued, close the files (the caller removes them)."""
        self._stage.abort()
        try:
            self._close_files()
        except Exception:  # closing after an error must not hide the error
            pass

    def _write(self, rows) -> None:
        import torch

        ok = rows.valid
        probs = rows.probs()
        cls = class_map(probs).masked_fill_(~ok, self.nodata).cpu().numpy()
        self.counts += np.bincount(cls.reshape(-1), minlength=256)
        self._cls.write_rows(rows.row, cls, col=rows.col)
        if self._prob is None:
            return
        if self.prob_dtype == "uint8":
            q = torch.round(probs * PROB_SCALE).to(torch.uint8).masked_fill_(~ok, 255)
        else:
            q = probs.masked_fill_(~ok, float("nan"))
        self._prob.write_rows(rows.row, q.cpu().numpy(), col=rows.col)

    def _close_files(self) -> None:
        for w in (self._cls, self._prob):
            if w is not None:
                w.close()


__all__ = ["PROB_SCALE", "PredictionWriter", "class_map", "colormap"]
