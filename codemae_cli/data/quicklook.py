"""Quick-look PNG of a few prepared chip pairs (optical | SAR | labels), matplotlib Agg."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _stretch(img: np.ndarray) -> np.ndarray:
    """2-98 % percentile stretch over valid pixels to [0, 1]; NaN -> 0."""
    ok = np.isfinite(img)
    if not ok.any():
        return np.zeros_like(img, dtype=np.float32)
    lo, hi = np.percentile(img[ok], [2, 98])
    out = (img - lo) / (hi - lo if hi > lo else 1.0)
    return np.clip(np.nan_to_num(out, nan=0.0), 0, 1).astype(np.float32)


def _rgb_bands(names: list[str]) -> list[int]:
    """Indices of red, green, blue when the band names say so, else the first three bands."""
    lower = [n.lower() for n in names]
    for trio in (("red", "green", "blue"), ("b04", "b03", "b02"), ("b4", "b3", "b2"), ("r", "g", "b")):
        if all(t in lower for t in trio):
            return [lower.index(t) for t in trio]
    return [0, 1, 2] if len(names) >= 3 else [0]


def write_quicklook(root: str | Path, path: str | Path, n: int = 4) -> Path:
    """Plot ``n`` chips spread over the dataset at ``root`` into ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from codemae_cli.data.shards import PreparedDataset

    ds = PreparedDataset(root)
    picks = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    cols = 3 if ds.has_labels else 2
    fig, axes = plt.subplots(len(picks), cols, figsize=(3 * cols, 3 * len(picks)), squeeze=False)
    bands = _rgb_bands(ds.meta["optical"]["bands"])
    for row, i in zip(axes, picks, strict=True):
        chip = ds.read(int(i))
        opt = chip["optical"][bands]
        rgb = np.stack([_stretch(b) for b in opt], axis=-1)
        row[0].imshow(rgb if rgb.shape[-1] == 3 else rgb[..., 0], cmap=None if rgb.shape[-1] == 3 else "gray")
        row[0].set_title(f"optical {chip['chip_id']}", fontsize=7)
        row[1].imshow(_stretch(chip["sar"][0]), cmap="gray")
        row[1].set_title(f"SAR {ds.meta['sar']['bands'][0]} (dB) [{chip['split']}]", fontsize=7)
        if ds.has_labels:
            lab = chip["label"].astype(np.float32)
            lab[chip["label"] == 255] = np.nan
            row[2].imshow(lab, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
            row[2].set_title("labels", fontsize=7)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
