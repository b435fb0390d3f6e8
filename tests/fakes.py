"""Fakes for tests. A prepared dataset of random chips (``make_synthetic_dataset``: the package's
``codemae_cli.bench.synthetic.write_synthetic_dataset``, which ``codemae bench loader`` uses too;
written by the one writer of the format), so tests of the loader, pretraining and DDP need no
rasters. A pretraining checkpoint as ``codemae pretrain`` writes it, with random weights. A tiny
model configuration and a random input pair."""

from __future__ import annotations

from pathlib import Path

from codemae_cli.bench.synthetic import write_synthetic_dataset as make_synthetic_dataset

__all__ = ["make_synthetic_dataset", "pretrain_checkpoint", "random_pair", "tiny_model_config"]


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
