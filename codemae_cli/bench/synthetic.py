"""A prepared dataset of random chips, for ``codemae bench loader`` and the tests.

The chips are written by the format's one writer (``codemae_cli.data.shards``), so they load
like the output of ``codemae prepare``; they have no real content (a smooth pattern plus noise,
different for every chip). The tests reach it as ``tests/fakes.make_synthetic_dataset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CRS = "EPSG:32631"
RES = 4.5  # metres per pixel of the chip footprints in index.gpkg


@dataclass(frozen=True)
class _ChipRecipe:
    """What every chip of one dataset looks like."""

    tile: int
    optical_bands: int
    sar_bands: int
    labels: bool
    nodata_fraction: float  # SAR: leading rows set to NaN
    optical_nodata_fraction: float  # optical: leading columns set to NaN

    def draw(self, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray):
        """One chip: optical (C, T, T) like 8-bit reflectance, SAR (S, T, T) like dB backscatter
        and labels (T, T) uint8 or None; all float32 but the labels."""
        t = self.tile
        phase = rng.uniform(0, 6.28, size=3)
        base = np.sin(6 * xx + phase[0]) * np.cos(5 * yy + phase[1])  # smooth: crops of two chips differ
        opt = np.stack([80 + 60 * base + rng.normal(0, 10, (t, t)) + 20 * b for b in range(self.optical_bands)])
        sar = np.stack([-12 + 4 * base + rng.normal(0, 2, (t, t)) - 5 * b for b in range(self.sar_bands)])
        opt = np.clip(np.rint(opt), 0, 255).astype(np.float32)
        sar = sar.astype(np.float32)
        sar[:, : int(t * self.nodata_fraction)] = np.nan
        opt[:, :, : int(t * self.optical_nodata_fraction)] = np.nan
        lab = None
        if self.labels:
            lab = (base > 0).astype(np.uint8)
            lab[:2] = 255  # two ignored rows
        return opt, sar, lab


def write_synthetic_dataset(root, n_chips: int = 64, tile: int = 256, optical_bands: int = 3,
                            sar_bands: int = 2, labels: bool = False, paired: bool = True,
                            n_val: int = 0, seed: int = 0, nodata_fraction: float = 0.0,
                            shard_size: int = 1024, optical_dtype: str = "uint8",
                            optical_nodata_fraction: float = 0.0) -> Path:
    """Write ``n_chips`` random chips at ``root`` in the ``codemae prepare`` format
    (docs/architecture.md, 1); returns ``root``.

    Optical chips are stored as ``optical_dtype``, SAR in dB; ``nodata_fraction`` of each
    chip's rows are nodata in the SAR, ``optical_nodata_fraction`` of its columns in the optical;
    ``labels`` adds a two-class label (two ignored rows); the last ``n_val`` chips are the val
    split. The chip footprints tile a square on EPSG:32631 at 4.5 m. The same arguments write
    the same chips.
    """
    from shapely.geometry import box

    from codemae_cli.data.shards import ShardLayout, ShardWriter, finish_dataset

    root = Path(root)
    layout = ShardLayout.for_source(optical_dtype, tile=tile, optical_bands=optical_bands, sar_bands=sar_bands,
                                    labels=labels)
    writer = ShardWriter(root / "shards", layout, shard_size=shard_size, prefix="part")
    recipe = _ChipRecipe(tile, optical_bands, sar_bands, labels, nodata_fraction, optical_nodata_fraction)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32) / tile
    per_row = max(1, int(np.ceil(np.sqrt(n_chips))))
    rows, geoms = [], []
    for i in range(n_chips):
        opt, sar, lab = recipe.draw(rng, yy, xx)
        split = "val" if i >= n_chips - n_val else "train"
        part, offset = writer.write(opt, sar, lab, train=split == "train")
        r, c = divmod(i, per_row)
        ok_opt, ok_sar = np.isfinite(opt).all(0), np.isfinite(sar).all(0)
        rows.append({"chip_id": f"synth_{i:05d}", "scene_id": "synth", "optical_src": "synthetic",
                     "sar_src": "synthetic", "row": r * tile, "col": c * tile, "valid_optical": float(ok_opt.mean()),
                     "valid_sar": float(ok_sar.mean()), "valid_joint": float((ok_opt & ok_sar).mean()),
                     "split": split, "shard": part, "offset": offset})
        x0, y0 = 500000 + c * tile * RES, 5750000 - r * tile * RES
        geoms.append(box(x0, y0 - tile * RES, x0 + tile * RES, y0))
    finish_dataset(root, layout, writer.close(), rows, geoms, CRS, writer.stats,
                   _metadata(tile, optical_bands, sar_bands, labels, paired, optical_dtype))
    return root


def _metadata(tile: int, optical_bands: int, sar_bands: int, labels: bool, paired: bool, optical_dtype: str) -> dict:
    """The writer's own metadata.json keys (bands, labels, scenes), as prepare writes them."""
    sar_names = ["VV", "VH", "HH", "HV"][:sar_bands] if sar_bands <= 4 else [f"S{b + 1}" for b in range(sar_bands)]
    return {
        "stride": tile, "crs": CRS, "res": [RES, RES], "ref": "optical", "paired": paired,
        "optical": {"bands": [f"B{b + 1}" for b in range(optical_bands)], "source_dtype": optical_dtype,
                    "nodata": None},
        "sar": {"bands": sar_names, "scale": "db", "input_scale": "db"},
        "labels": {"source": "synthetic", "classes": {"0": "background", "1": "foreground"}, "ignore_index": 255}
        if labels else None,
        "scenes": [{"scene_id": "synth", "optical": "synthetic", "sar": "synthetic", "labels": None}],
        "dropped": {}, "synthetic": True,
    }


__all__ = ["write_synthetic_dataset"]
