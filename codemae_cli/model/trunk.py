"""The trunk a recipe names: ``model.backbone`` picks the plain ViT encoder or the iTPN one.

Both encoders share :class:`~codemae_cli.model.encoder.EncoderBase`; this module sits above the
two so that neither imports the other.
"""

from __future__ import annotations

import torch.nn as nn

from codemae_cli.model.encoder import CoDeMAEEncoder, EncoderBase
from codemae_cli.model.itpn import ITPNEncoder


def build_trunk(cfg, optical_bands: int, sar_bands: int) -> EncoderBase:
    """The encoder ``cfg.backbone`` names, sized by ``cfg.preset`` (random weights)."""
    spec = cfg.spec
    common = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=int(spec["embed_dim"]),
                  depth=int(spec["depth"]), num_heads=int(spec["num_heads"]), mlp_ratio=float(spec["mlp_ratio"]),
                  drop_path=cfg.drop_path, fused_attn=cfg.fused_attn)
    if cfg.backbone == "itpn":
        encoder = ITPNEncoder(optical_bands, sar_bands, mlp_depth=int(spec["mlp_depth"]),
                              bridge_mlp_ratio=float(spec["bridge_mlp_ratio"]), fpn_dim=int(spec["fpn_dim"]),
                              **common)
    else:
        encoder = CoDeMAEEncoder(optical_bands, sar_bands, **common)
    if getattr(cfg, "pos_embed", "fixed") == "learnable":
        # The reference trains its absolute position table (a parameter initialised with
        # sin-cos); the buffer becomes a parameter of the same name, so it is saved and loaded.
        table = encoder.pos_embed_key
        values = getattr(encoder, table).detach().clone()
        delattr(encoder, table)
        setattr(encoder, table, nn.Parameter(values))
    return encoder
