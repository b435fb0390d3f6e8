"""A pretrained CoDe-MAE encoder + a task head, for optical, SAR or both inputs.

    model = TaskModel(encoder, head, inputs="both", fusion="concat", layers=(3, 5, 7, 11))
    logits = model(optical=x_opt, sar=x_sar)     # (B, K, H, W) or (B, K)
    logits = model(optical=x_opt)                # a bi-modal model with SAR missing

Bi-modal fusion happens per encoder depth, before the head: ``concat`` (concatenate the two
maps, 1x1 conv back to the encoder width) or ``mean`` (average of the available maps). A
missing modality is replaced, per sample, by a learned "absent" embedding (concat) or left out
of the average (mean); training with ``modality_dropout`` teaches the model to use that path,
so it keeps predicting when a scene has only one of the two rasters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from codemae_cli.model.errors import ModelInputError


class ModalityFusion(nn.Module):
    """Per-depth fusion of optical and SAR maps (B, D, h, w) with per-sample presence masks."""

    def __init__(self, dim: int, num_levels: int, mode: str = "concat"):
        super().__init__()
        if mode not in ("concat", "mean"):
            raise ValueError(f"unknown fusion '{mode}'")
        self.mode = mode
        if mode == "concat":
            self.proj = nn.ModuleList(nn.Conv2d(2 * dim, dim, 1) for _ in range(num_levels))
            # Stand-in for a modality that is absent: one learned vector per depth and modality.
            self.absent = nn.Parameter(torch.zeros(2, num_levels, dim))
            nn.init.trunc_normal_(self.absent, std=0.02)

    def forward(self, opt: Optional[list], sar: Optional[list], keep_opt: torch.Tensor,
                keep_sar: torch.Tensor) -> list[torch.Tensor]:
        """``keep_*``: (B,) float, 1 where that modality is present for the sample."""
        ref = opt if opt is not None else sar
        out = []
        for i, x in enumerate(ref):
            b, d, h, w = x.shape
            if self.mode == "mean":
                ko = keep_opt.view(b, 1, 1, 1).to(x.dtype)
                ks = keep_sar.view(b, 1, 1, 1).to(x.dtype)
                o = opt[i] * ko if opt is not None else 0.0
                s = sar[i] * ks if sar is not None else 0.0
                out.append((o + s) / (ko + ks).clamp_min(1.0))  # (B, D, h, w)
                continue
            absent_o = self.absent[0, i].view(1, d, 1, 1).to(x.dtype).expand(b, d, h, w)
            absent_s = self.absent[1, i].view(1, d, 1, 1).to(x.dtype).expand(b, d, h, w)
            # torch.where keeps both branches in the graph, so the absent embeddings are part of
            # every step and DDP never sees an unused parameter.
            o = torch.where(keep_opt.view(b, 1, 1, 1) > 0, opt[i], absent_o) if opt is not None else absent_o
            s = torch.where(keep_sar.view(b, 1, 1, 1) > 0, sar[i], absent_s) if sar is not None else absent_s
            out.append(self.proj[i](torch.cat([o, s], 1)))  # (B, D, h, w)
        return out


class TaskModel(nn.Module):
    """Encoder + (fusion) + head. ``forward(optical=None, sar=None) -> logits``."""

    def __init__(self, encoder: nn.Module, head: nn.Module, inputs: str = "both", fusion: str = "concat",
                 layers: Optional[Sequence[int]] = None, modality_dropout: float = 0.0,
                 freeze_encoder: bool = False, task: str = "segmentation"):
        super().__init__()
        if inputs not in ("optical", "sar", "both"):
            raise ValueError(f"inputs must be optical, sar or both, not {inputs!r}")
        self.encoder = encoder
        self.head = head
        self.inputs = inputs
        self.task = task
        self.layers = tuple(int(i) for i in (layers if layers is not None else default_layers(encoder)))
        self.modality_dropout = float(modality_dropout)
        self.freeze_encoder = bool(freeze_encoder)
        # An encoder with its own pyramid (iTPN) feeds a pyramid head its multi-stride maps.
        self.pyramid = bool(getattr(encoder, "multiscale", False)) and getattr(head, "multiscale_input", False)
        dim = encoder.pyramid_dim if self.pyramid else getattr(encoder, "feature_dim", encoder.embed_dim)
        levels = 4 if self.pyramid else len(self.layers)
        self.fusion = ModalityFusion(dim, levels, fusion) if inputs == "both" else None
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a probed encoder keeps its inference behaviour (no drop-path)
        return self

    # ---- stages -----------------------------------------------------------------------------
    def _check_inputs(self, optical, sar):
        if optical is None and sar is None:
            raise ModelInputError("the model needs at least one input image (optical or SAR)")
        if self.inputs == "optical" and optical is None:
            raise ModelInputError("this model was trained on optical images; an optical input is required")
        if self.inputs == "sar" and sar is None:
            raise ModelInputError("this model was trained on SAR images; a SAR input is required")

    def _presence(self, optical, sar, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample presence (B,) of each modality, with modality dropout while training."""
        keep_opt = torch.full((batch,), float(optical is not None), device=device)
        keep_sar = torch.full((batch,), float(sar is not None), device=device)
        if self.training and self.modality_dropout > 0 and optical is not None and sar is not None:
            drop = torch.rand(batch, device=device) < self.modality_dropout
            drop_sar = torch.rand(batch, device=device) < 0.5  # never drop both
            keep_opt = torch.where(drop & ~drop_sar, torch.zeros_like(keep_opt), keep_opt)
            keep_sar = torch.where(drop & drop_sar, torch.zeros_like(keep_sar), keep_sar)
        return keep_opt, keep_sar

    def forward_features(self, optical=None, sar=None) -> list[torch.Tensor]:
        """Fused maps at the chosen depths [(B, D, H/p, W/p), ...], or the encoder's pyramid."""
        self._check_inputs(optical, sar)
        if self.inputs == "optical":
            sar = None
        elif self.inputs == "sar":
            optical = None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            if self.pyramid:
                feats = self.encoder.forward_pyramid(optical=optical, sar=sar)  # strides p/4 .. 2p
            else:
                feats = self.encoder.forward_features(optical=optical, sar=sar, layers=self.layers)
        if self.fusion is None:
            return feats["optical" if self.inputs == "optical" else "sar"]
        x = optical if optical is not None else sar
        keep_opt, keep_sar = self._presence(optical, sar, x.shape[0], x.device)
        return self.fusion(feats.get("optical"), feats.get("sar"), keep_opt, keep_sar)

    def forward(self, optical=None, sar=None) -> torch.Tensor:
        x = optical if optical is not None else sar
        feats = self.forward_features(optical, sar)  # [(B, D, h, w)] * n_layers
        return self.head(feats, out_size=tuple(x.shape[-2:]))  # (B, K, H, W) | (B, K)


def default_layers(encoder) -> tuple[int, ...]:
    """Four evenly spaced depths ending at the last block (the encoder's own choice if it has one)."""
    layers = getattr(encoder, "default_layers", None)
    if layers is not None and len(layers) == 4:
        return tuple(int(i) for i in layers)
    d = int(encoder.depth)
    if d < 4:
        return tuple(range(d)) + (d - 1,) * (4 - d)
    return (d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1)


def find_unused_parameters(model: nn.Module, optical_bands: int, sar_bands: int, size: int) -> list[str]:
    """Names of trainable parameters that receive no gradient in one forward/backward pass.

    Used once before training to freeze what the chosen inputs never touch (the SAR patch
    embedding of an optical-only model, ...): DDP without ``find_unused_parameters`` would stall
    on them, and the optimizer would decay them for nothing. Runs in eval mode on a tiny batch
    so that no running statistics move.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    opt = torch.zeros(2, optical_bands, size, size, device=device) if model.inputs != "sar" else None
    sar = torch.zeros(2, sar_bands, size, size, device=device) if model.inputs != "optical" else None
    model.zero_grad(set_to_none=True)
    out = model(optical=opt, sar=sar)
    out.float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


__all__ = ["ModalityFusion", "TaskModel", "default_layers", "find_unused_parameters"]
