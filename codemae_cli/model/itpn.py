"""The iTPN backbone of the paper: a HiViT trunk with an integrally pretrained feature pyramid.

Stages (B images, N patches of p px on an h x w grid, n kept patches, k = 4 inner patches per
side, D trunk width, F pyramid width):

    patch_embed     conv p/4 px, one per modality       (B, N, k, k, D/4)   inner patches of each patch
    [gather]        masked patches dropped               (B, n, k, k, D/4)
    stage 4         MLP-only blocks, patch merge         (B, n, k/2, k/2, D/2)
    stage 8         MLP-only blocks, patch merge         (B, n, 1, 1, D) -> (B, n, D)
    positions       fixed 2-D sin-cos table (+ gather)   (B, n, D)
    trunk           transformer blocks at stride 16      (B, n, D)
    neck            pyramid at strides 16 / 8 / 4        [(B, n, 1, 1, F), (B, n, 2, 2, F), (B, n, 4, 4, F)]

The early stages act within one patch (no attention, no mixing across patches), so masked
patches are dropped before them, exactly as MAE drops them before its ViT. Module and key names
follow the reference implementation (``blocks`` holds the MLP blocks, the two patch merges and
the transformer blocks in one list; ``absolute_pos_embed``; ``align_dim_*``, ``split_*``,
``block_*``, ``fpn_modules`` for the neck), so its weights map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

from codemae_cli.model.encoder import EncoderBase
from codemae_cli.model.layers import make_block, norm_layer, sincos_pos_embed

INNER = 4  # inner patches per side of each patch: strides p/4, p/2, p


class ITPNPatchEmbed(nn.Module):
    """One modality's image -> the k x k inner patches of every patch: (B, C, H, W) -> (B, N, k, k, dim)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        inner = patch_size // INNER
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=inner, stride=inner)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.proj(x)  # (B, dim, h*k, w*k)
        x = x.view(B, -1, h, INNER, w, INNER).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, k, k, dim)
        return self.norm(x.reshape(B, h * w, INNER, INNER, -1))  # (B, N, k, k, dim)


class MlpBlock(nn.Module):
    """HiViT's attention-free block, x + MLP(LN(x)) per token: an inner patch sees no other."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerge(nn.Module):
    """2 x 2 neighbouring inner patches -> one of twice the width: (..., k, k, C) -> (..., k/2, k/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Order (row, col) = (0,0), (1,0), (0,1), (1,1), as the reference concatenates them.
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class PatchSplit(nn.Module):
    """One token -> 2 x 2 finer tokens of the pyramid width: (B, n, k, k, C) -> (B, n, 2k, 2k, F)."""

    def __init__(self, dim: int, fpn_dim: int):
        super().__init__()
        self.fpn_dim = fpn_dim
        self.norm = norm_layer(dim)
        self.reduction = nn.Linear(dim, 4 * fpn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, k, _, _ = x.shape
        x = self.reduction(self.norm(x)).reshape(B, n, k, k, 2, 2, self.fpn_dim)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, n, 2 * k, 2 * k, self.fpn_dim)


def reference_pos_embed(table: torch.Tensor, base: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The reference's bicubic resampling of the (1, h0*w0, D) table to ``grid``.

    It scales by (h + 0.1) / h0 (DINO's guard against rounding), so even on the table's own
    grid the result is a slightly shifted, smoothed table: the reference applies it whenever
    the tokens are masked, and continued pretraining from its weights must see the same.
    """
    (h0, w0), (h, w) = base, grid
    D = table.shape[-1]
    maps = table.float().reshape(1, h0, w0, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    out = F.interpolate(maps, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic")
    if tuple(out.shape[-2:]) != (h, w):  # float rounding of the scale factor: fall back to sizes
        out = F.interpolate(maps, size=(h, w), mode="bicubic")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, D).to(table.dtype)


def level_maps(level: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pyramid tokens to an image-like map: (B, h*w, k, k, F) -> (B, F, h*k, w*k)."""
    B, _, k, _, C = level.shape
    h, w = grid
    return level.reshape(B, h, w, k, k, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * k, w * k)


class PyramidDecoderEmbed(nn.ModuleList):
    """The pyramid levels, each through its own LN + Linear, summed into the decoder tokens.

    Level i (stride p / 2^i, 4^i tokens per patch) is projected to Dd / 4^i per token, so each
    patch's tokens concatenate to Dd: [(B, n, k_i, k_i, F)] -> (B, n, Dd). Keys as the reference
    (``decoder_embed.<level>.0`` norm, ``.1`` linear).
    """

    def __init__(self, fpn_dim: int, dim: int, levels: int = 3):
        super().__init__(nn.Sequential(norm_layer(fpn_dim), nn.Linear(fpn_dim, dim // 4 ** i)) for i in range(levels))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        out = None
        for layer, x in zip(self, levels, strict=True):
            y = layer(x).reshape(x.shape[0], x.shape[1], -1)  # (B, n, Dd)
            out = y if out is None else out + y
        return out


class ITPNEncoder(EncoderBase):
    """Per-modality inner-patch embeddings, shared HiViT trunk and pyramid neck."""

    multiscale = True
    pos_embed_key = "absolute_pos_embed"  # the reference's name

    def __init__(self, optical_bands: int, sar_bands: int, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 512, depth: int = 24, num_heads: int = 8, mlp_ratio: float = 4.0,
                 mlp_depth: int = 3, bridge_mlp_ratio: float = 3.0, fpn_dim: int = 256,
                 drop_path: float = 0.0, fused_attn: bool = True):
        super().__init__(optical_bands, sar_bands, img_size, patch_size, embed_dim, depth, num_heads)
        if patch_size % INNER or embed_dim % 4:
            raise ValueError("the iTPN backbone needs a patch size and a width divisible by 4")
        d4, d8 = embed_dim // 4, embed_dim // 2
        self.mlp_depth = mlp_depth
        self.fpn_dim = fpn_dim
        self.feature_dim = embed_dim
        self.pyramid_dim = fpn_dim
        self.patch_embed = nn.ModuleDict(
            {m: ITPNPatchEmbed(c, d4, patch_size) for m, c in self.bands.items() if c > 0}
        )
        # Fixed sin-cos table, but stored: a checkpoint carries the values it was trained with.
        self.register_buffer("absolute_pos_embed", sincos_pos_embed(embed_dim, *self.grid))  # (1, N, D)
        self._pos_cache: dict = {}  # grid -> (key, resampled table): see pos_embed
        n_blocks = 2 * mlp_depth + depth
        dpr = iter([drop_path * i / max(n_blocks - 1, 1) for i in range(n_blocks)])  # grows with depth
        blocks: list[nn.Module] = [MlpBlock(d4, bridge_mlp_ratio, next(dpr)) for _ in range(mlp_depth)]
        blocks.append(PatchMerge(d4))
        blocks += [MlpBlock(d8, bridge_mlp_ratio, next(dpr)) for _ in range(mlp_depth)]
        blocks.append(PatchMerge(d8))
        blocks += [make_block(embed_dim, num_heads, mlp_ratio, next(dpr), fused_attn) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.num_early = 2 * mlp_depth + 2
        # Pyramid neck (strides 16, 8, 4).
        self.align_dim_16tofpn = nn.Linear(embed_dim, fpn_dim) if embed_dim != fpn_dim else None
        self.align_dim_16to8 = nn.Linear(d8, fpn_dim, bias=False)
        self.split_16to8 = PatchSplit(embed_dim, fpn_dim)
        self.block_16to8 = nn.Sequential(MlpBlock(fpn_dim, mlp_ratio))
        self.align_dim_8to4 = nn.Linear(d4, fpn_dim, bias=False)
        self.split_8to4 = PatchSplit(fpn_dim, fpn_dim)
        self.block_8to4 = nn.Sequential(MlpBlock(fpn_dim, mlp_ratio))
        self.fpn_modules = nn.ModuleList(MlpBlock(fpn_dim, mlp_ratio) for _ in range(3))

    # -- stages -------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Inner-patch tokens: (B, C, H, W) -> (B, N, k, k, D/4)."""
        self.check_image(x, modality)
        return self.patch_embed[modality](x)

    def forward_early(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """MLP stages and merges: (B, n, k, k, D/4) -> (B, n, D), plus the stride-4 and stride-8
        tokens before each merge (the neck's lateral inputs)."""
        early = []
        for blk in self.blocks[: self.num_early]:
            if isinstance(blk, PatchMerge):
                early.append(x)
            x = blk(x)
        return x[:, :, 0, 0, :], early

    def pos_embed(self, grid: tuple[int, int], masked: bool) -> torch.Tensor:
        """(1, h*w, D) positions for ``grid``; masked forwards use the reference's resampled table.

        The fixed table's resampling is cached per grid: it is the same every step. The key holds
        the table's storage, device, dtype and version counter, so moving the model, casting it or
        loading weights (an in-place copy) invalidates it. A learnable table (``model.pos_embed:
        learnable``) is resampled every time, so that its gradient flows; so is a traced one
        (torch.compile folds the fixed table's resampling into the graph).
        """
        table = self.absolute_pos_embed
        if not masked and tuple(grid) == self.grid:
            return table
        if table.requires_grad or torch.compiler.is_compiling():
            return reference_pos_embed(table, self.grid, grid)
        key = (tuple(grid), table.device, table.dtype, table.data_ptr(), table._version)
        cached = self._pos_cache.get(tuple(grid))
        if cached is None or cached[0] != key:
            # Not an inference tensor even when first asked under inference_mode: training reuses it.
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, reference_pos_embed(table, self.grid, grid))
            self._pos_cache[tuple(grid)] = cached
        return cached[1]

    def forward_neck(self, x: torch.Tensor, early: list[torch.Tensor]) -> list[torch.Tensor]:
        """Trunk tokens (B, n, D) + lateral tokens -> [(B, n, 1, 1, F), (B, n, 2, 2, F), (B, n, 4, 4, F)]."""
        x = x[:, :, None, None, :]  # (B, n, 1, 1, D)
        outs = [x if self.align_dim_16tofpn is None else self.align_dim_16tofpn(x)]
        x = self.block_16to8(self.split_16to8(x) + self.align_dim_16to8(early[1]))  # (B, n, 2, 2, F)
        outs.append(x)
        x = self.block_8to4(self.split_8to4(x) + self.align_dim_8to4(early[0]))  # (B, n, 4, 4, F)
        outs.append(x)
        return [m(o) for m, o in zip(self.fpn_modules, outs, strict=True)]

    def forward_masked(self, images: Sequence[tuple[str, torch.Tensor]], ids_keep: torch.Tensor,
                       aux_layer: Optional[int] = None) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """Encode only the visible patches of several modalities as ONE batch.

        Returns the pyramid levels (stride 16, 8, 4) of the visible patches, each (M*B, n, k, k, F),
        and, when ``aux_layer`` is given, the output of that transformer block (M*B, n, D).
        """
        grid = self.check_image(images[0][1], images[0][0])
        tokens = torch.cat([self.embed(x, m) for m, x in images], dim=0)  # (M*B, N, k, k, D/4)
        keep = ids_keep.repeat(len(images), 1)  # (M*B, n): the same mask for every modality
        x = torch.gather(tokens, 1, keep[:, :, None, None, None].expand(-1, -1, *tokens.shape[2:]))
        x, early = self.forward_early(x)  # (M*B, n, D): masked patches never reach the trunk
        pos = self.pos_embed(grid, masked=True).to(x.dtype)  # (1, N, D)
        x = x + torch.gather(pos.expand(x.shape[0], -1, -1), 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        aux = None
        for i, blk in enumerate(self.blocks[self.num_early:]):
            x = blk(x)
            if i == aux_layer:
                aux = x
        return self.forward_neck(x, early), aux

    def trunk_input(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All patches, embedded: (B, N, k, k, D/4) -> trunk input (B, N, D) with positions."""
        x, early = self.forward_early(x)
        return x + self.pos_embed(grid, masked=False).to(x.dtype), early

    def run_trunk(self, x: torch.Tensor, grid: tuple[int, int], layers: Sequence[int], norm: bool) -> dict:
        x, _ = self.trunk_input(x, grid)
        feats = {}
        for i, blk in enumerate(self.blocks[self.num_early: self.num_early + max(layers) + 1]):
            x = blk(x)
            if i in layers:
                feats[i] = x  # no final norm in iTPN: the decoder embedding / neck normalise
        return feats

    def forward_tokens(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """All patch tokens of one modality through the trunk: (B, C, H, W) -> (B, N, D)."""
        grid = self.check_image(x, modality)
        return self.run_trunk(self.embed(x, modality), grid, (self.depth - 1,), False)[self.depth - 1]

    def forward_pyramid(self, optical: Optional[torch.Tensor] = None,
                        sar: Optional[torch.Tensor] = None) -> dict[str, list[torch.Tensor]]:
        """Pyramid maps, finest first: {"optical": [(B, F, 4h, 4w), (B, F, 2h, 2w), (B, F, h, w),
        (B, F, h/2, w/2)], ...} at strides p/4, p/2, p, 2p (the last average-pooled from p)."""
        out: dict[str, list[torch.Tensor]] = {}
        for group, grid in self.input_groups(optical, sar):
            x = torch.cat([self.embed(img, m) for m, img in group], dim=0)  # (M*B, N, k, k, D/4)
            x, early = self.trunk_input(x, grid)
            for blk in self.blocks[self.num_early:]:
                x = blk(x)
            levels = self.forward_neck(x, early)[::-1]  # strides 4, 8, 16
            maps = [level_maps(lv, grid) for lv in levels]
            maps.append(F.avg_pool2d(maps[-1], 2, ceil_mode=True))  # stride 2p, as the reference's detector
            start = 0
            for m, img in group:
                B = img.shape[0]
                out[m] = [f[start: start + B] for f in maps]
                start += B
        return out


__all__ = ["ITPNEncoder", "ITPNPatchEmbed", "MlpBlock", "PatchMerge", "PatchSplit", "PyramidDecoderEmbed",
           "level_maps", "reference_pos_embed"]
