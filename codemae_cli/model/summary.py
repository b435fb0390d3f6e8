"""Parameter and FLOP summary of the presets (``codemae model info``)."""

from __future__ import annotations

from codemae_cli.model.config import PRESETS, CCLConfig, CDRConfig, ModelConfig, OKDConfig


def preset_table(optical_bands: int = 3, sar_bands: int = 2, img_size: int = 224, patch_size: int = 16) -> list[dict]:
    """One row per preset: sizes, trainable parameters (encoder / full CoDe-MAE with an EMA
    teacher, all components on) and analytic training GFLOP per pair. Models are built on the
    meta device, so nothing is allocated."""
    import torch

    from codemae_cli.model.codemae import build_model
    from codemae_cli.model.flops import mae_step_flops, pretrain_step_flops

    rows = []
    for name, spec in PRESETS.items():
        cfg = ModelConfig(preset=name, img_size=img_size, patch_size=patch_size,
                          okd=OKDConfig(teacher="ema"), ccl=CCLConfig(), cdr=CDRConfig())
        cfg.validate()
        with torch.device("meta"):
            model = build_model(cfg, optical_bands, sar_bands)
        enc = sum(p.numel() for p in model.encoder.parameters())
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(dict(
            preset=name, embed_dim=int(spec["embed_dim"]), depth=int(spec["depth"]), heads=int(spec["num_heads"]),
            decoder=f"{int(spec['decoder_depth'])}x{int(spec['decoder_dim'])}", encoder_params=enc,
            model_params=total,
            gflop_per_pair=pretrain_step_flops(cfg, optical_bands, sar_bands, 1) / 1e9,
            mae_gflop_per_image=mae_step_flops(name, optical_bands, 1, img_size, patch_size) / 1e9,
        ))
    return rows
