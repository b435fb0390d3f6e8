"""The ``model:`` section of a pretraining recipe, and the named model presets.

Pure Python (no torch import), so recipes can be loaded and validated instantly.
Every CoDe-MAE component is a switch here, so the paper's ablations and baselines are recipe
overrides:

    plain joint MAE        --set model.okd.enabled=false model.ccl.mode=off model.cdr.enabled=false
    rigid alignment        --set model.ccl.mode=rigid
    msGFM-like full cross  --set model.cdr.degradation=none

Switches that reproduce the reference code where codemae deliberately differs (defaults are
codemae's; docs/architecture.md lists every term):

    --set model.ccl.gather_grad=false          negatives gathered across GPUs without gradient
    --set model.ccl.rigid_on=decoder_embed     rigid contrast on the decoder-embedding projection
    --set model.pos_embed=learnable            learnable encoder positions (sin-cos initialised)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from codemae_cli.errors import UserError

# Trunk and decoder sizes per preset. `base` is the reference setting (ViT-B/16 trunk, 8 x 512
# decoders with 16 heads); `tiny` exists so CPU tests run in seconds.
PRESETS: dict[str, dict[str, float]] = {
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
                 decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                  decoder_dim=256, decoder_depth=4, decoder_heads=8),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                  decoder_dim=512, decoder_depth=8, decoder_heads=16),
}


# iTPN presets (HiViT trunk + feature pyramid, the reference's `itpn_base_dec512d8b` and
# `itpn_large_dec768d8b`): each 16-px patch is embedded as 4 x 4 inner patches of width
# embed_dim / 4; `mlp_depth` MLP-only blocks (hidden `bridge_mlp_ratio` x width) at strides 4
# and 8, joined by patch merging; `depth` transformer blocks at stride 16; a pyramid neck of
# width `fpn_dim` at strides 16 / 8 / 4. `tiny` exists so CPU tests run in seconds.
ITPN_PRESETS: dict[str, dict[str, float]] = {
    "tiny": dict(embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, mlp_depth=1, bridge_mlp_ratio=3.0,
                 fpn_dim=32, decoder_dim=64, decoder_depth=2, decoder_heads=4),
    "base": dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=4.0, mlp_depth=3, bridge_mlp_ratio=3.0,
                 fpn_dim=256, decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "large": dict(embed_dim=768, depth=40, num_heads=12, mlp_ratio=4.0, mlp_depth=2, bridge_mlp_ratio=3.0,
                  fpn_dim=256, decoder_dim=768, decoder_depth=8, decoder_heads=16),
}

BACKBONES = ("vit", "itpn")


def preset_spec(name: str, backbone: str = "vit") -> dict[str, float]:
    if backbone not in BACKBONES:
        raise UserError(f"unknown model.backbone '{backbone}'; choose one of {', '.join(BACKBONES)}")
    table = ITPN_PRESETS if backbone == "itpn" else PRESETS
    if name not in table:
        raise UserError(f"unknown preset '{name}' for the {backbone} backbone; choose one of {', '.join(table)}")
    return table[name]


@dataclass
class OKDConfig:
    """Optical-anchored knowledge distillation from a frozen (or EMA) teacher.

    Teacher input (timm / file teachers): the student sees dataset-normalised optical bands;
    the teacher gets the optical bands ``teacher_bands`` as R, G, B (default: red, green, blue
    where the datasets' band names say which bands those are (data/raster.py choose_rgb, the
    decision CDR's luminance also reads), else the first three; one band
    as grey; pretraining's start-up line names them, checkpoints record them) at the source's
    own scale in [0, 1] (dataset normalisation undone, divided by the source range recorded at
    prepare time: 8-bit / 255 as in the reference; no per-image stretch, so a dark scene stays
    dark and colour balance is kept), then normalised with the teacher's own ``pretrained_cfg``
    mean/std. An EMA teacher is a copy of the student's optical encoder and
    sees exactly what the student sees.
    """

    enabled: bool = True
    teacher: Literal["timm", "file", "ema"] = "ema"
    teacher_model: str = "vit_large_patch16_dinov3.sat493m"
    teacher_weights: Optional[str] = None  # local .safetensors file, read only with teacher: file
    teacher_pretrained: bool = False  # teacher: timm -> load the hub weights (needs them cached)
    teacher_bands: Optional[list[int]] = None  # 0-based optical band indices fed to the teacher as R, G, B
    ema_momentum: float = 0.996
    sar_side: bool = False  # also map SAR visible tokens to the paired optical teacher tokens
    aux_head: bool = True  # auxiliary head from the trunk at 3/4 depth through 2 extra blocks
    weight: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise UserError("model.okd.ema_momentum must lie in [0, 1]")
        if self.weight < 0:
            raise UserError("model.okd.weight must not be negative")
        if self.enabled and self.teacher == "file" and not self.teacher_weights:
            raise UserError("model.okd.teacher is 'file' but model.okd.teacher_weights names no file")
        if self.teacher_bands is not None:
            if not self.teacher_bands or any(b < 0 for b in self.teacher_bands):
                raise UserError("model.okd.teacher_bands must list non-negative optical band indices")


@dataclass
class CCLConfig:
    """Conditioned contrastive learning (residual cross-attention, then symmetric InfoNCE)."""

    mode: Literal["conditioned", "rigid", "off"] = "conditioned"
    temperature: float = 0.07
    num_heads: int = 16
    weight: float = 1.0
    # Negatives gathered from the other GPUs carry gradient back to them (the exact gradient of
    # the global-batch loss). false: gathered without gradient, as the reference code does.
    gather_grad: bool = True
    # Where the rigid (unconditioned) contrast sits: the encoder output (codemae) or the
    # decoder-embedding projection that feeds the decoders (the reference code).
    rigid_on: Literal["encoder", "decoder_embed"] = "encoder"

    def validate(self) -> None:
        if self.temperature <= 0:
            raise UserError("model.ccl.temperature must be positive")
        if self.num_heads < 1:
            raise UserError("model.ccl.num_heads must be at least 1")
        if self.weight < 0:
            raise UserError("model.ccl.weight must not be negative")


@dataclass
class CDRConfig:
    """Cross-modal degraded reconstruction (optical -> degraded SAR, SAR -> degraded optical)."""

    enabled: bool = True
    # The reference code's forms under its names, and codemae's own variants (spatial_mean,
    # dual_mean, hog_cells); model/targets.py describes each.
    degradation: Literal["none", "channel", "spatial", "dual", "hog", "sar_gradient", "median",
                         "spatial_mean", "dual_mean", "hog_cells"] = "channel"
    # Optical band indices of R, G, B for the luminance 0.299R+0.587G+0.114B. None: red, green,
    # blue of the run's one decision (data/raster.py choose_rgb: the datasets' band names, as the
    # OKD teacher reads them; without telling names the first three of a 3- or 4-band image, else
    # the band mean). An empty list forces the band mean.
    rgb_bands: Optional[list[int]] = None
    weight: float = 1.0

    def validate(self) -> None:
        if self.weight < 0:
            raise UserError("model.cdr.weight must not be negative")
        if self.rgb_bands is not None and len(self.rgb_bands) not in (0, 3):
            raise UserError("model.cdr.rgb_bands must list three band indices (R, G, B) or none")


@dataclass
class ModelConfig:
    # vit: plain ViT trunk (timm blocks); itpn: the paper's iTPN (HiViT trunk + feature pyramid).
    backbone: Literal["vit", "itpn"] = "vit"
    preset: Literal["tiny", "small", "base", "large"] = "base"
    # Pretrained start for the student encoder: a local weights file (.safetensors, or a .pth
    # read with torch's weights-only loader): a timm ViT for vit, an iTPN release for itpn.
    init_weights: Optional[str] = None
    img_size: int = 224
    patch_size: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    fused_attn: bool = True  # scaled_dot_product_attention; false = plain matmul/softmax fallback
    self_weight: float = 1.0
    drop_path: float = 0.0
    # Encoder position embedding: a fixed 2-D sin-cos table (codemae) or a learnable table
    # initialised with it (the reference code's absolute_pos_embed).
    pos_embed: Literal["fixed", "learnable"] = "fixed"
    okd: OKDConfig = field(default_factory=OKDConfig)
    ccl: CCLConfig = field(default_factory=CCLConfig)
    cdr: CDRConfig = field(default_factory=CDRConfig)

    def validate(self) -> None:
        spec = preset_spec(self.preset, self.backbone)
        if self.backbone == "itpn" and self.patch_size % 4:
            raise UserError(f"model.patch_size {self.patch_size} must be a multiple of 4 for the iTPN backbone "
                            "(4 x 4 inner patches per patch)")
        if self.backbone == "itpn" and int(spec["decoder_dim"]) % 16:
            raise UserError("the iTPN decoder width must be divisible by 16 (its stride-4 level feeds width / 16)")
        if self.patch_size < 1 or self.img_size < self.patch_size:
            raise UserError("model.patch_size must be at least 1 and no larger than model.img_size")
        if self.img_size % self.patch_size:
            raise UserError(
                f"model.img_size {self.img_size} is not divisible by model.patch_size {self.patch_size}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError("model.mask_ratio must lie in [0, 1)")
        num_patches = (self.img_size // self.patch_size) ** 2
        if int(num_patches * (1 - self.mask_ratio)) < 1:
            raise UserError("model.mask_ratio leaves no visible patch at this image and patch size")
        if self.self_weight < 0:
            raise UserError("model.self_weight must not be negative")
        if not 0.0 <= self.drop_path < 1.0:
            raise UserError("model.drop_path must lie in [0, 1)")
        if self.ccl.mode == "conditioned" and int(spec["decoder_dim"]) % self.ccl.num_heads:
            raise UserError(
                f"model.ccl.num_heads {self.ccl.num_heads} does not divide the decoder width "
                f"{int(spec['decoder_dim'])} of preset '{self.preset}'"
            )
        for section in (self.okd, self.ccl, self.cdr):
            section.validate()
        if self.cdr.enabled and self.cdr.degradation == "hog_cells" and self.patch_size % 2:
            raise UserError("model.cdr.degradation 'hog_cells' needs an even model.patch_size (2 x 2 cells per patch)")
        if self.cdr.enabled and self.cdr.degradation == "hog" and self.img_size < 8:
            raise UserError("model.cdr.degradation 'hog' needs model.img_size of at least 8 (8-px cells)")

    @property
    def spec(self) -> dict[str, float]:
        return preset_spec(self.preset, self.backbone)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


__all__ = ["BACKBONES", "CCLConfig", "CDRConfig", "ITPN_PRESETS", "ModelConfig", "OKDConfig", "PRESETS", "preset_spec"]
