"""The CoDe-MAE model: encoder, decoders, targets, OKD teacher, CCL, presets, FLOP count.

    from codemae_cli.model import ModelConfig, build_model
    model = build_model(ModelConfig(preset="tiny", img_size=64), optical_bands=3, sar_bands=2)
    out = model(optical, sar, paired=True)   # out["losses"], out["loss"]

Names are resolved lazily so that ``from codemae_cli.model.config import ModelConfig`` (recipe
loading) does not import torch. Nothing here imports rasterio or geopandas.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "config",
    "OKDConfig": "config",
    "CCLConfig": "config",
    "CDRConfig": "config",
    "PRESETS": "config",
    "CoDeMAE": "codemae",
    "build_model": "codemae",
    "build_encoder": "codemae",
    "random_masking": "codemae",
    "CoDeMAEEncoder": "encoder",
    "ITPNEncoder": "itpn",
    "build_trunk": "trunk",
    "load_init_weights": "weights",
    "ITPN_PRESETS": "config",
    "PlainMAE": "plain_mae",
    "build_plain_mae": "plain_mae",
    "pretrain_step_flops": "flops",
    "mae_step_flops": "flops",
    "gather_with_grad": "dist",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"codemae_cli.model.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'codemae_cli.model' has no attribute '{name}'")


def __dir__():
    return __all__
