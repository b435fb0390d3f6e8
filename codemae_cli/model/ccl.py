"""CCL: conditioned contrastive learning, and the rigid InfoNCE baseline."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from codemae_cli.model.dist import gather_no_grad, gather_with_grad, world_size_and_rank
from codemae_cli.model.layers import CrossAttention


def info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.07,
             gather_grad: bool = True) -> torch.Tensor:
    """Symmetric (CLIP-style) InfoNCE between L2-normalised rows z_a, z_b (B, d).

    Positives are the pairs (i, i); negatives are all other rows of the other modality,
    gathered from every rank, so the effective batch is the global one. ``gather_grad``: the
    gathered rows carry gradient back to their ranks (the exact gradient of the global loss);
    false gathers them without gradient, as the reference code does.
    """
    z_a, z_b = z_a.float(), z_b.float()
    gather = gather_with_grad if gather_grad else gather_no_grad
    all_a = gather(z_a)  # (world*B, d)
    all_b = gather(z_b)
    _, rank = world_size_and_rank()
    labels = torch.arange(z_a.shape[0], device=z_a.device) + rank * z_a.shape[0]
    logits_ab = z_a @ all_b.t() / temperature  # (B, world*B)
    logits_ba = z_b @ all_a.t() / temperature
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


def pooled_embedding(tokens: torch.Tensor) -> torch.Tensor:
    """Mean over tokens, then L2 normalisation: (B, n, d) -> (B, d)."""
    return F.normalize(tokens.float().mean(dim=1), dim=-1)


class ConditionedContrast(nn.Module):
    """u_o = h_o + CA_o(LN h_o, LN h_s), u_s = h_s + CA_s(LN h_s, LN h_o); InfoNCE on pooled u.

    The learnable cross-attention absorbs the pull toward agreement ("gradient buffering"),
    so the encoder tokens themselves need not become identical across modalities.
    """

    def __init__(self, dim: int, num_heads: int = 16, temperature: float = 0.07, fused_attn: bool = True,
                 gather_grad: bool = True):
        super().__init__()
        self.temperature = temperature
        self.gather_grad = gather_grad
        self.cross_optical = CrossAttention(dim, num_heads, fused_attn)  # queries: optical
        self.cross_sar = CrossAttention(dim, num_heads, fused_attn)  # queries: SAR

    def forward(self, h_o: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
        """h_o, h_s: (B, n, d) decoder-embedded visible tokens of a pair -> scalar loss."""
        u_o = self.cross_optical(h_o, h_s)  # (B, n, d)
        u_s = self.cross_sar(h_s, h_o)
        return info_nce(pooled_embedding(u_o), pooled_embedding(u_s), self.temperature, self.gather_grad)
