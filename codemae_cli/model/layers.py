"""Building blocks on timm's public layers: transformer blocks, patch embedding, positions."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block

# MAE / timm ViT use eps=1e-6 LayerNorms throughout.
norm_layer = partial(nn.LayerNorm, eps=1e-6)


def make_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
               fused_attn: bool = True) -> Block:
    """A pre-norm ViT block (timm). ``fused_attn`` picks scaled_dot_product_attention or the
    plain matmul/softmax path (debugging, FLOP counting on CPU)."""
    block = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path,
                  norm_layer=norm_layer)
    set_fused_attn(block, fused_attn)
    return block


def set_fused_attn(module: nn.Module, enabled: bool) -> None:
    """Switch every timm attention inside ``module`` between the fused and the plain path."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(enabled)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE layout): (1, grid_h * grid_w, dim).

    Half of the channels encode the row, half the column, each as sin/cos at geometric
    frequencies, so the table needs no training and extends to any grid.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, not {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                            torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, D/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    # MAE puts the column (w) encoding first, then the row (h).
    emb = torch.cat([encode(xs), encode(ys)], dim=1)  # (N, D)
    return emb.float().unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, h*w, D) table to another grid (timm's resample_abs_pos_embed)."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(grid), num_prefix_tokens=0)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection of one modality: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class CrossAttention(nn.Module):
    """Residual multi-head cross-attention without MLP: x + proj(attn(LN(x) -> q, LN(ctx) -> k, v)).

    This is CCL's "gradient buffer": the contrastive pull acts on what each modality can read
    from the other, not directly on the encoder tokens.
    """

    def __init__(self, dim: int, num_heads: int, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        # torch's default eps (1e-5), unlike every other LayerNorm here (1e-6): the reference
        # builds these two with plain nn.LayerNorm, and imported weights were trained with it.
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = context.shape[1]
        q = self.q(self.norm_q(x)).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B,h,N,d)
        kv = self.kv(self.norm_kv(context)).reshape(B, M, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B,h,M,d) each
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B,h,N,M)
            out = attn.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(B, N, C)
        return x + self.proj(out)


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears (and patch projections as linears), unit LNs."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, PatchEmbed):
        w = module.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(module.proj.bias)


def evenly_spaced_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` block indices spread evenly over the trunk, the last one being the last block."""
    count = min(count, depth)
    return tuple(sorted({max(0, math.ceil((i + 1) * depth / count) - 1) for i in range(count)}))
