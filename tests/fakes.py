"""Fakes for tests. A prepared dataset: random chips written by the one writer of the format
(``codemae_cli.data.shards``), so tests of the loader, pretraining and DDP need no rasters. A
pretraining checkpoint as ``codemae pretrain`` writes it, with random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_synthetic_dataset(root, n_chips: int = 64, tile: int = 256, optical_bands: int = 3,
                           sar_bands: int = 2, labels: bool = False, paired: bool = True,
                           n_val: int = 0, seed: int = 0, nodata_fraction: float = 0.0,
                           shard_size: int = 1024, optical_dtype: str = "uint8",
                           optical_nodata_fraction: float = 0.0) -> Path:
    """Write a random dataset in the ``codemae prepare`` format (docs/architecture.md, 1).

    Optical chips look like 8-bit reflectance (stored as ``optical_dtype``), SAR like dB
    backscatter; ``nodata_fraction`` of each chip's rows are nodata in the SAR,
    ``optical_nodata_fraction`` of its columns in the optical. The last ``n_val`` chips are
    the val split. The chips have no real content.
    """
    from shapely.geometry import box

    from codemae_cli.data.shards import ShardLayout, ShardWriter, finish_dataset

    root = Path(root)
    layout = ShardLayout.for_source(optical_dtype, tile=tile, optical_bands=optical_bands, sar_bands=sar_bands,
                                    labels=labels)
    writer = ShardWriter(root / "shards", layout, shard_size=shard_size, prefix="part")
    rng = np.random.default_rng(seed)
    rows, geoms = [], []
    res = 4.5
    per_row = max(1, int(np.ceil(np.sqrt(n_chips))))
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32) / tile
    for i in range(n_chips):
        split = "val" if i >= n_chips - n_val else "train"
        # Smooth structure plus noise so crops of different chips differ visibly.
        phase = rng.uniform(0, 6.28, size=3)
        base = np.sin(6 * xx + phase[0]) * np.cos(5 * yy + phase[1])
        opt = np.stack([80 + 60 * base + rng.normal(0, 10, (tile, tile)) + 20 * b for b in range(optical_bands)])
        sar = np.stack([-12 + 4 * base + rng.normal(0, 2, (tile, tile)) - 5 * b for b in range(sar_bands)])
        opt = np.clip(np.rint(opt), 0, 255).astype(np.float32)
        sar = sar.astype(np.float32)
        if nodata_fraction > 0:
            sar[:, : int(tile * nodata_fraction)] = np.nan
        if optical_nodata_fraction > 0:
            opt[:, :, : int(tile * optical_nodata_fraction)] = np.nan
        lab = (base > 0).astype(np.uint8) if labels else None
        if labels:
            lab[:2] = 255
        part, offset = writer.write(opt, sar, lab, train=split == "train")
        r, c = divmod(i, per_row)
        x0, y0 = 500000 + c * tile * res, 5750000 - r * tile * res
        v_opt = float(np.isfinite(opt).all(0).mean())
        v_sar = float(np.isfinite(sar).all(0).mean())
        v_joint = float((np.isfinite(opt).all(0) & np.isfinite(sar).all(0)).mean())
        rows.append({"chip_id": f"synth_{i:05d}", "scene_id": "synth", "optical_src": "synthetic",
                     "sar_src": "synthetic", "row": r * tile, "col": c * tile, "valid_optical": v_opt,
                     "valid_sar": v_sar, "valid_joint": v_joint, "split": split, "shard": part, "offset": offset})
        geoms.append(box(x0, y0 - tile * res, x0 + tile * res, y0))
    parts = writer.close()
    finish_dataset(root, layout, parts, rows, geoms, "EPSG:32631", writer.stats, {
        "stride": tile, "crs": "EPSG:32631", "res": [res, res], "ref": "optical", "paired": paired,
        "optical": {"bands": [f"B{b + 1}" for b in range(optical_bands)], "source_dtype": optical_dtype,
                    "nodata": None},
        "sar": {"bands": ["VV", "VH", "HH", "HV"][:sar_bands] if sar_bands <= 4 else [f"S{b + 1}" for b in range(sar_bands)],
                "scale": "db", "input_scale": "db"},
        "labels": {"source": "synthetic", "classes": {"0": "background", "1": "foreground"}, "ignore_index": 255}
        if labels else None,
        "scenes": [{"scene_id": "synth", "optical": "synthetic", "sar": "synthetic", "labels": None}],
        "dropped": {}, "synthetic": True,
    })
    return root


def pretrain_checkpoint(path, *, optical_bands=("blue", "green", "red", "nir"), sar_bands=("VV", "VH"),
                        preset: str = "tiny", img_size: int = 32, patch_size: int = 8, ccl: str | None = "off",
                        cdr: bool | None = None, degradation: str | None = None, stats: dict | None = None,
                        seed: int | None = 0, source_range: dict | None = None) -> Path:
    """A CoDe-MAE pretraining checkpoint directory at ``path`` (random weights, no distillation).

    ``ccl``, ``cdr``, ``degradation``: the CCL mode, the cross decoder switch and its degradation
    (None: the model's defaults); ``stats``: the normalisation the checkpoint records (None: none,
    readers use the dataset's); ``source_range``: the source scale it records (None: none, as
    checkpoints written before it); ``seed``: of the weights (None: the global torch generator).
    """
    import torch

    from codemae_cli.config import to_dict
    from codemae_cli.model import ModelConfig, build_model
    from codemae_cli.train.checkpoint import save_checkpoint

    if seed is not None:
        torch.manual_seed(seed)
    cfg = ModelConfig(preset=preset, img_size=img_size, patch_size=patch_size)
    cfg.okd.enabled = False
    if ccl is not None:
        cfg.ccl.mode = ccl
    if cdr is not None:
        cfg.cdr.enabled = cdr
    if degradation is not None:
        cfg.cdr.degradation = degradation
    model = build_model(cfg, optical_bands=len(optical_bands), sar_bands=len(sar_bands))
    meta = {"kind": "pretrain", "step": 0, "epoch": 0, "recipe": {"model": to_dict(cfg)},
            "bands": {"optical": list(optical_bands), "sar": list(sar_bands)}, "stats": stats}
    if source_range is not None:
        meta["source_ranges"] = [source_range]
    return save_checkpoint(Path(path), model, meta)


def tiny_model_config(**over):
    """The tiny CoDe-MAE ``ModelConfig`` at 32 px with 8-px patches; ``over`` sets fields, a dict
    value updates that section (``okd={"teacher": "ema"}``)."""
    from codemae_cli.config import from_dict
    from codemae_cli.model import ModelConfig

    data = {"preset": "tiny", "img_size": 32, "patch_size": 8}
    for key, value in over.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return from_dict(ModelConfig, data)


def random_pair(B=3, co=4, cs=2, size=32, seed=0):
    """An optical (B, co, size, size) and a SAR (B, cs, size, size) batch of standard normal values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, co, size, size, generator=g), torch.randn(B, cs, size, size, generator=g)
