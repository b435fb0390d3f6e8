"""A plain single-modality MAE of the same size: the benchmark baseline (and the per-modality
MAE baseline of the paper)."""

from __future__ import annotations

import torch
import torch.nn as nn

from codemae_cli.model.codemae import random_masking
from codemae_cli.model.config import preset_spec
from codemae_cli.model.decoder import MAEDecoder, PatchHeads
from codemae_cli.model.encoder import CoDeMAEEncoder
from codemae_cli.model.layers import init_weights
from codemae_cli.model.targets import masked_mse, pixel_target


class PlainMAE(nn.Module):
    """MAE (He et al.) on one image modality: encoder on visible patches, 8 x 512 decoder for
    ``base``, per-patch normalised pixel loss on masked patches."""

    def __init__(self, preset: str = "base", in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True, fused_attn: bool = True,
                 modality: str = "optical"):
        super().__init__()
        spec = preset_spec(preset)
        self.modality = modality
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = patch_size
        bands = {"optical": 0, "sar": 0, modality: in_chans}
        self.encoder = CoDeMAEEncoder(
            bands["optical"], bands["sar"], img_size=img_size, patch_size=patch_size,
            embed_dim=int(spec["embed_dim"]), depth=int(spec["depth"]), num_heads=int(spec["num_heads"]),
            mlp_ratio=float(spec["mlp_ratio"]), fused_attn=fused_attn,
        )
        Dd = int(spec["decoder_dim"])
        self.decoder_embed = nn.Linear(int(spec["embed_dim"]), Dd)
        self.decoder = MAEDecoder(Dd, int(spec["decoder_depth"]), int(spec["decoder_heads"]), self.encoder.grid,
                                  float(spec["mlp_ratio"]), fused_attn)
        self.head = PatchHeads(Dd, {modality: in_chans * patch_size * patch_size})
        self.apply(init_weights)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def forward(self, x: torch.Tensor) -> dict:
        B = x.shape[0]
        grid = self.encoder.check_image(x, self.modality)
        N = grid[0] * grid[1]
        ids_keep, ids_restore, mask = random_masking(B, N, self.mask_ratio, x.device)
        latent, _ = self.encoder.forward_masked([(self.modality, x)], ids_keep)  # (B, n, D)
        dec = self.decoder(self.decoder_embed(latent), ids_restore, grid)  # (B, N, Dd)
        pred = self.head(dec, self.modality)  # (B, N, C p^2)
        with torch.autocast(x.device.type, enabled=False):
            target = pixel_target(x, self.patch_size, self.norm_pix_loss)
        loss = masked_mse(pred, target, mask)
        return {"loss": loss, "losses": {f"self_{self.modality}": loss}, "pred": pred, "mask": mask}


def build_plain_mae(preset: str = "base", in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                    mask_ratio: float = 0.75, norm_pix_loss: bool = True, fused_attn: bool = True,
                    modality: str = "optical") -> PlainMAE:
    return PlainMAE(preset, in_chans, img_size, patch_size, mask_ratio, norm_pix_loss, fused_attn, modality)
