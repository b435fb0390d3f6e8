"""Task heads on ViT features: UPerNet / FPN segmentation, classification, linear probes.

All heads take a list of feature maps ``[(B, D, h, w), ...]`` from several encoder depths, all
at the patch stride (a plain ViT has one scale), and return logits. Segmentation heads return
``(B, K, H, W)`` at the requested output size.

The pyramid heads first turn the single-scale ViT maps into strides p/4, p/2, p, 2p with
transposed convolutions and a max-pool (the "simple feature pyramid" of ViTDet and the MAE /
BEiT segmentation code). An iTPN encoder brings its own pyramid (strides p/4, p/2, p from its
neck, 2p pooled), so the head takes those maps as they are (``multiscale_input``): boundaries
come from real stride-4 features instead of upsampled 16-px tokens. Norm layers are per-pixel LayerNorm over channels (``LayerNorm2d``):
independent of the batch (tiny per-GPU batches, no SyncBatchNorm under DDP) and, unlike
GroupNorm/InstanceNorm, they do not subtract a chip's spatial mean, so a chip that is all water
still looks different from a chip that is all land.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
            LayerNorm2d(cout),
            nn.GELU(),
        )


class SimplePyramid(nn.Module):
    """Four same-stride ViT maps -> strides p/4, p/2, p, 2p (finest first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)  # ceil: a 1-token map stays 1 token

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        f0, f1, f2, f3 = feats
        return [self.up4(f0), self.up2(f1), f2, self.down2(f3)]


class PPM(nn.Module):
    """Pyramid pooling module of PSPNet/UPerNet on the coarsest level."""

    def __init__(self, cin: int, cout: int, scales=(1, 2, 3, 6)):
        super().__init__()
        self.scales = scales
        self.convs = nn.ModuleList(ConvNormAct(cin, cout, 1) for _ in scales)
        self.bottleneck = ConvNormAct(cin + len(scales) * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x]
        for s, conv in zip(self.scales, self.convs, strict=False):
            pooled = conv(F.adaptive_avg_pool2d(x, s))  # (B, C, s, s)
            outs.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=False))
        return self.bottleneck(torch.cat(outs, 1))  # (B, C, h, w)


class PyramidSegHead(nn.Module):
    """UPerNet (PPM on the top level + FPN + fuse all levels) or plain FPN (sum of levels).

    Input: four maps (B, D, h, w); output logits (B, K, H, W) at ``out_size``.
    """

    def __init__(self, in_dim: int, num_classes: int, neck_dim: int = 256, kind: str = "upernet",
                 dropout: float = 0.1, multiscale_input: bool = False):
        super().__init__()
        if kind not in ("upernet", "fpn"):
            raise ValueError(f"unknown pyramid head '{kind}'")
        self.kind = kind
        self.multiscale_input = multiscale_input
        self.pyramid = None if multiscale_input else SimplePyramid(in_dim)
        n_lat = 3 if kind == "upernet" else 4  # UPerNet's top level goes through the PPM instead
        self.lateral = nn.ModuleList(ConvNormAct(in_dim, neck_dim, 1) for _ in range(n_lat))
        self.ppm = PPM(in_dim, neck_dim) if kind == "upernet" else None
        self.smooth = nn.ModuleList(ConvNormAct(neck_dim, neck_dim, 3) for _ in range(4))
        self.fuse = ConvNormAct(4 * neck_dim, neck_dim, 3) if kind == "upernet" else ConvNormAct(neck_dim, neck_dim, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(neck_dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        if len(feats) != 4:
            raise ValueError(f"the {self.kind} head needs features from 4 encoder depths, got {len(feats)}")
        levels = feats if self.pyramid is None else self.pyramid(feats)  # strides p/4, p/2, p, 2p
        if self.ppm is not None:
            lat = [conv(x) for conv, x in zip(self.lateral, levels[:3], strict=False)] + [self.ppm(levels[3])]
        else:
            lat = [conv(x) for conv, x in zip(self.lateral, levels, strict=False)]
        # Top-down pathway: coarse semantics added into finer levels.
        for i in range(3, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        outs = [smooth(x) for smooth, x in zip(self.smooth, lat, strict=False)]  # each (B, C, h_i, w_i)
        size = outs[0].shape[-2:]
        ups = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        fused = self.fuse(torch.cat(ups, 1) if self.kind == "upernet" else sum(ups))  # (B, C, H/4, W/4)
        logits = self.classifier(self.dropout(fused))  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


class LinearSegHead(nn.Module):
    """Linear probe for segmentation: BatchNorm without affine + 1x1 conv on the last map."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim, affine=False)
        self.classifier = nn.Conv2d(in_dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.norm(feats[-1]))  # (B, K, h, w)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


class ClassificationHead(nn.Module):
    """Mean-pooled tokens of the last map(s) -> LayerNorm -> Linear (MAE fine-tuning head)."""

    def __init__(self, in_dim: int, num_classes: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(in_dim * num_layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim * num_layers, num_classes)
        # Small initial weights keep the first steps from disturbing the pretrained encoder.
        nn.init.trunc_normal_(self.classifier.weight, std=2e-5)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: list[torch.Tensor], out_size=None) -> torch.Tensor:
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in feats[-self.num_layers:]], 1)  # (B, D*n)
        return self.classifier(self.dropout(self.norm(pooled)))  # (B, K)


class LinearClsHead(nn.Module):
    """Linear probe for classification: mean-pooled last map -> BatchNorm1d(no affine) -> Linear."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, feats: list[torch.Tensor], out_size=None) -> torch.Tensor:
        return self.classifier(self.norm(feats[-1].mean(dim=(2, 3))))  # (B, K)


def build_head(kind: str, head: str, in_dim: int, num_classes: int, neck_dim: int = 256,
               multiscale_input: bool = False) -> nn.Module:
    """The head for a task kind ("segmentation": upernet | fpn | linear; "classification":
    pool | linear). ``multiscale_input``: the pyramid heads get maps at strides p/4 .. 2p."""
    if kind == "segmentation":
        if head == "linear":
            return LinearSegHead(in_dim, num_classes)
        if head in ("upernet", "fpn"):
            return PyramidSegHead(in_dim, num_classes, neck_dim=neck_dim, kind=head, multiscale_input=multiscale_input)
        raise ValueError(f"segmentation has no '{head}' head (upernet, fpn or linear)")
    if kind == "classification":
        if head == "linear":
            return LinearClsHead(in_dim, num_classes)
        if head == "pool":
            return ClassificationHead(in_dim, num_classes)
        raise ValueError(f"classification has no '{head}' head (pool or linear)")
    raise ValueError(f"unknown task kind '{kind}'")


__all__ = [
    "ClassificationHead",
    "LinearClsHead",
    "LinearSegHead",
    "PyramidSegHead",
    "SimplePyramid",
    "build_head",
]
