"""The CoDe-MAE encoders: one patch embedding per modality, one shared trunk.

``CoDeMAEEncoder`` is the plain ViT; ``codemae_cli.model.itpn.ITPNEncoder`` the paper's iTPN.
Both share :class:`EncoderBase` (input checks, ``forward_features`` over trunk depths);
:func:`codemae_cli.model.trunk.build_trunk` picks one from the recipe's ``model.backbone``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn as nn

from codemae_cli.errors import UserError
from codemae_cli.model.errors import ModelInputError
from codemae_cli.model.layers import (
    PatchEmbed,
    evenly_spaced_layers,
    make_block,
    norm_layer,
    resize_pos_embed,
    sincos_pos_embed,
)

MODALITIES = ("optical", "sar")


class EncoderBase(nn.Module):
    """What every backbone shares: band bookkeeping, input checks and dense features from
    several trunk depths. Subclasses provide ``patch_embed`` (a ModuleDict by modality),
    ``embed(x, modality)``, ``run_trunk(x, grid, layers, norm) -> {layer: (B, N, D)}``,
    ``forward_masked`` and ``forward_tokens``."""

    multiscale = False  # True: ``forward_pyramid`` gives maps at several strides
    pos_embed_key = "pos_embed"  # the absolute position table's attribute (and state-dict) name

    def __init__(self, optical_bands: int, sar_bands: int, img_size: int, patch_size: int, embed_dim: int,
                 depth: int, num_heads: int):
        super().__init__()
        if optical_bands < 0 or sar_bands < 0 or optical_bands + sar_bands == 0:
            raise UserError("the encoder needs at least one optical or SAR band")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.feature_dim = embed_dim  # width of the maps forward_features returns
        self.depth = depth
        self.num_heads = num_heads
        self.bands = {"optical": optical_bands, "sar": sar_bands}
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.default_layers = evenly_spaced_layers(depth, 4)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A position table stored for another crop size (learnable, or the iTPN's stored one) is
        # resampled to this encoder's grid before it is loaded.
        key = prefix + self.pos_embed_key
        table = state_dict.get(key)
        own = getattr(self, self.pos_embed_key)
        if table is not None and table.shape != own.shape and table.shape[-1] == self.embed_dim:
            side = math.isqrt(table.shape[1])
            if side * side == table.shape[1]:
                state_dict[key] = resize_pos_embed(table, (side, side), self.grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_image(self, x: torch.Tensor, modality: str) -> tuple[int, int]:
        if modality not in self.patch_embed:
            raise ModelInputError(f"this encoder has no {modality} input")
        if x.ndim != 4:
            raise ModelInputError(f"{modality} input must be (batch, bands, height, width), got shape {tuple(x.shape)}")
        want = self.bands[modality]
        if x.shape[1] != want:
            raise ModelInputError(f"{modality} input has {x.shape[1]} bands but the model expects {want}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ModelInputError(f"{modality} input size {H}x{W} is not divisible by the patch size {p}")
        return H // p, W // p

    def input_groups(self, optical: Optional[torch.Tensor], sar: Optional[torch.Tensor]
                     ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], tuple[int, int]]]:
        """The given modalities as groups that run as one batch, with their patch grid:
        co-registered pairs share the grid and run together (one trunk pass)."""
        inputs = [(m, x) for m, x in (("optical", optical), ("sar", sar)) if x is not None]
        if not inputs:
            raise ModelInputError("the encoder needs an optical or a SAR input")
        grids = {m: self.check_image(x, m) for m, x in inputs}
        batches = {m: x.shape[0] for m, x in inputs}
        if len(inputs) == 2 and len(set(grids.values())) == 1 and len(set(batches.values())) == 1:
            yield inputs, grids[inputs[0][0]]
            return
        for m, x in inputs:
            yield [(m, x)], grids[m]

    def forward_features(self, optical: Optional[torch.Tensor] = None, sar: Optional[torch.Tensor] = None,
                         layers: Optional[Sequence[int]] = None, norm: bool = True) -> dict[str, list[torch.Tensor]]:
        """Dense features of the given modalities from several trunk depths.

        Returns {"optical": [(B, D, H/p, W/p), ...], "sar": [...]} (only the modalities given),
        one map per entry of ``layers`` (block indices, default ``default_layers``). ``norm``
        applies the trunk's final LayerNorm to every map (timm's forward_intermediates style)
        where the backbone has one.
        """
        layers = tuple(self.default_layers if layers is None else layers)
        if not layers:
            raise ModelInputError("forward_features needs at least one layer index")
        for i in layers:
            if not -self.depth <= i < self.depth:
                raise ModelInputError(f"layer index {i} is outside the encoder's {self.depth} blocks")
        layers = tuple(i % self.depth for i in layers)
        out: dict[str, list[torch.Tensor]] = {}
        for group, (h, w) in self.input_groups(optical, sar):
            x = torch.cat([self.embed(img, m) for m, img in group], dim=0)  # (M*B, N, ...)
            feats = self.run_trunk(x, (h, w), layers, norm)  # layer -> (M*B, N, D)
            start = 0
            for m, img in group:
                B = img.shape[0]
                out[m] = [
                    feats[i][start : start + B].transpose(1, 2).reshape(B, self.embed_dim, h, w)
                    for i in layers
                ]  # (B, D, h, w) per layer
                start += B
        return out

    def forward(self, optical: Optional[torch.Tensor] = None, sar: Optional[torch.Tensor] = None,
                layers: Optional[Sequence[int]] = None) -> dict[str, list[torch.Tensor]]:
        return self.forward_features(optical=optical, sar=sar, layers=layers)


class CoDeMAEEncoder(EncoderBase):
    """Per-modality patch embeddings feeding one shared transformer trunk (plain ViT).

    A modality with 0 bands gets no patch embedding (single-modality MAE baselines).
    Position embeddings are a fixed 2-D sin-cos table for ``img_size``, rebuilt from the sizes
    rather than stored (a non-persistent buffer), so an encoder built for another crop size
    loads the same checkpoint; inputs of other sizes resample the table bicubically.
    ``model.pos_embed: learnable`` (the reference code's form, see :func:`codemae_cli.model.trunk.build_trunk`) makes it a
    parameter initialised with sin-cos; a stored table of another grid is resampled when loaded.
    """

    def __init__(self, optical_bands: int, sar_bands: int, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, fused_attn: bool = True):
        super().__init__(optical_bands, sar_bands, img_size, patch_size, embed_dim, depth, num_heads)
        self.patch_embed = nn.ModuleDict(
            {m: PatchEmbed(c, embed_dim, patch_size) for m, c in self.bands.items() if c > 0}
        )
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, *self.grid), persistent=False)  # (1, N, D)
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            [make_block(embed_dim, num_heads, mlp_ratio, dpr[i], fused_attn) for i in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

    # -- stages -------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Patch tokens with positions: (B, C, H, W) -> (B, N, D)."""
        grid = self.check_image(x, modality)
        tokens = self.patch_embed[modality](x)  # (B, N, D)
        return tokens + resize_pos_embed(self.pos_embed, self.grid, grid).to(tokens.dtype)

    def forward_masked(self, images: Sequence[tuple[str, torch.Tensor]], ids_keep: torch.Tensor,
                       aux_layer: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Encode only the visible patches of several modalities as ONE batch.

        images: [(modality, (B, C_m, H, W)), ...]; ids_keep: (B, n) visible patch indices,
        shared by all modalities. Returns the normed trunk output (M*B, n, D) in the order of
        ``images`` and, when ``aux_layer`` is given, the raw output of that block (M*B, n, D).
        """
        tokens = torch.cat([self.embed(x, m) for m, x in images], dim=0)  # (M*B, N, D)
        keep = ids_keep.repeat(len(images), 1)  # (M*B, n): the same mask for every modality
        x = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (M*B, n, D)
        aux = None
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == aux_layer:
                aux = x
        return self.norm(x), aux

    def run_trunk(self, x: torch.Tensor, grid: tuple[int, int], layers: Sequence[int], norm: bool) -> dict:
        feats = {}
        for i, blk in enumerate(self.blocks[: max(layers) + 1]):
            x = blk(x)
            if i in layers:
                feats[i] = self.norm(x) if norm else x
        return feats

    def forward_tokens(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """All patch tokens of one modality through the trunk: (B, C, H, W) -> (B, N, D), normed."""
        x = self.embed(x, modality)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
