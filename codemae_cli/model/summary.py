"""Parameter and FLOP summary of the presets (``codemae model info``)."""

from __future__ import annotations

from typing import Optional

from codemae_cli.model.config import ITPN_PRESETS, PRESETS, CCLConfig, CDRConfig, ModelConfig, OKDConfig

NECK_PREFIXES = ("align_dim_", "split_", "block_16to8", "block_8to4", "fpn_modules")


def preset_table(optical_bands: int = 3, sar_bands: int = 2, img_size: int = 224, patch_size: int = 16,
                 backbone: str = "vit", preset: Optional[str] = None) -> list[dict]:
    """One row per preset of ``backbone`` (or just ``preset``): sizes, trainable parameters
    (encoder without / with the iTPN pyramid neck; full CoDe-MAE with an EMA teacher, all
    components on) and analytic training GFLOP per pair. Models are built on the meta device,
    so nothing is allocated."""
    import torch

    from codemae_cli.model.codemae import build_model
    from codemae_cli.model.flops import mae_step_flops, pretrain_step_flops

    table = ITPN_PRESETS if backbone == "itpn" else PRESETS
    rows = []
    for name, spec in table.items():
        if preset is not None and name != preset:
            continue
        cfg = ModelConfig(backbone=backbone, preset=name, img_size=img_size, patch_size=patch_size,
                          okd=OKDConfig(teacher="ema"), ccl=CCLConfig(), cdr=CDRConfig())
        cfg.validate()
        with torch.device("meta"):
            model = build_model(cfg, optical_bands, sar_bands)
        enc = sum(p.numel() for p in model.encoder.parameters())
        neck = sum(p.numel() for n, p in model.encoder.named_parameters() if n.startswith(NECK_PREFIXES))
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(dict(
            preset=name, embed_dim=int(spec["embed_dim"]), depth=int(spec["depth"]), heads=int(spec["num_heads"]),
            backbone=backbone, decoder=f"{int(spec['decoder_depth'])}x{int(spec['decoder_dim'])}",
            encoder_params=enc - neck, neck_params=neck,
            model_params=total,
            gflop_per_pair=pretrain_step_flops(cfg, optical_bands, sar_bands, 1) / 1e9,
            mae_gflop_per_image=(mae_step_flops(name, optical_bands, 1, img_size, patch_size) / 1e9
                                 if backbone == "vit" else None),
        ))
    return rows
