"""MAE-style decoders: visible tokens + mask tokens -> per-patch predictions."""

from __future__ import annotations

import torch
import torch.nn as nn

from codemae_cli.model.layers import make_block, norm_layer, resize_pos_embed, sincos_pos_embed


class MAEDecoder(nn.Module):
    """Transformer over the full token grid: visible tokens put back in place, a learned mask
    token everywhere else, fixed sin-cos positions; ends with a LayerNorm.

    The prediction heads are separate (:class:`PatchHeads`) so one decoder can serve several
    targets (both modalities of the self decoder, both directions of the cross decoder).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, grid: tuple[int, int],
                 mlp_ratio: float = 4.0, fused_attn: bool = True):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.grid = tuple(grid)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, *self.grid), persistent=False)  # (1, N, Dd)
        self.blocks = nn.ModuleList([make_block(dim, num_heads, mlp_ratio, 0.0, fused_attn) for _ in range(depth)])
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: (B, n, Dd) visible tokens in ids_keep order; ids_restore: (B, N). -> (B, N, Dd)."""
        B, n, D = x.shape
        N = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N - n, D)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, N, Dd) in shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # unshuffle
        x = x + resize_pos_embed(self.pos_embed, self.grid, grid).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class PatchHeads(nn.Module):
    """Linear prediction heads by target name; targets with the same width share one head
    (as in the reference, where both modalities/directions use one prediction layer)."""

    def __init__(self, dim: int, out_dims: dict[str, int]):
        super().__init__()
        self.out_dims = dict(out_dims)
        widths = sorted(set(out_dims.values()))
        self.heads = nn.ModuleDict({str(k): nn.Linear(dim, k) for k in widths})

    def forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.heads[str(self.out_dims[name])](x)
