"""Normalised model inputs back to their source scale in [0, 1] (see data/source_scale.py).

What the OKD teacher and the reference HOG / ratio-gradient targets see: the reference code
gives them the 8-bit image / 255; here every dataset records its source range at prepare time,
and the model undoes the dataset normalisation with one affine map per dataset and band.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from codemae_cli.model.errors import ModelInputError


class SourceScaler(nn.Module):
    """``x_src = clamp(x_norm * scale[d] + offset[d], 0, 1)`` per sample's dataset ``d``.

    Until :meth:`set_table` is called (models built outside a pretraining run: tests, benches,
    analyses on synthetic data) the map is the identity followed by the clamp, i.e. the inputs
    are taken to be at the source scale already. The tables are non-persistent buffers: they
    come from the datasets, not from the checkpoint.
    """

    def __init__(self, optical_bands: int, sar_bands: int):
        super().__init__()
        self.optical_bands = int(optical_bands)
        C = self.optical_bands + int(sar_bands)
        self.register_buffer("scale", torch.ones(1, C), persistent=False)  # (n_datasets, C)
        self.register_buffer("offset", torch.zeros(1, C), persistent=False)
        self.configured = False

    def set_table(self, table) -> None:
        """Load a :class:`codemae_cli.data.source_scale.SourceScale` (rows: datasets)."""
        scale = torch.as_tensor(table.scale, dtype=torch.float32)
        if scale.ndim != 2 or scale.shape[1] != self.scale.shape[1] or table.optical_bands != self.optical_bands:
            raise ValueError(f"source-scale table of shape {tuple(scale.shape)} does not fit "
                             f"{self.optical_bands} optical + {self.scale.shape[1] - self.optical_bands} SAR bands")
        device = self.scale.device
        self.scale = scale.to(device)
        self.offset = torch.as_tensor(table.offset, dtype=torch.float32).to(device)
        self.configured = True

    def forward(self, x: torch.Tensor, modality: str, source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, C_m, H, W) normalised; source: (B,) dataset numbers (None: dataset 0)."""
        co = self.optical_bands
        cols = slice(0, co) if modality == "optical" else slice(co, None)
        scale, offset = self.scale[:, cols], self.offset[:, cols]  # (n_datasets, C_m)
        if source is None:
            if scale.shape[0] > 1:
                raise ModelInputError("the batch mixes several datasets: pass each sample's dataset number as source")
            s, o = scale[:1], offset[:1]  # (1, C_m)
        else:
            d = source.to(device=scale.device, dtype=torch.long)
            s, o = scale[d], offset[d]  # (B, C_m)
        x = x.float() * s[:, :, None, None] + o[:, :, None, None]
        return x.clamp_(0.0, 1.0)
