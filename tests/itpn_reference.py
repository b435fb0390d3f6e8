"""A reference-named iTPN state dict with random values, and a plain functional forward over it.

The key names and shapes are those of the public CoDe-MAE reference (`itpn_*_dec*`, shared
decoders, distillation heads, conditioned contrast, cross decoder); the forward is written from
the reference's description with torch.nn.functional only, independently of codemae's modules,
so it checks codemae's import (key mapping) and architecture at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A tiny-width variant with the reference's structure (matches codemae's iTPN 'tiny' preset).
TINY = dict(embed_dim=64, depth=4, num_heads=2, mlp_depth=1, fpn_dim=32, dec=64, dec_depth=2, teacher=48)


def reference_state(bands: int = 3, patch: int = 8, grid: int = 4, seed: int = 0, c=TINY) -> dict:
    g = torch.Generator().manual_seed(seed)
    D, F_, Dd, md = c["embed_dim"], c["fpn_dim"], c["dec"], c["mlp_depth"]
    d4, d8 = D // 4, D // 2
    shapes: dict[str, tuple] = {}

    def lin(name, i, o, bias=True):
        shapes[f"{name}.weight"] = (o, i)
        if bias:
            shapes[f"{name}.bias"] = (o,)

    def ln(name, d):
        shapes[f"{name}.weight"] = (d,)
        shapes[f"{name}.bias"] = (d,)

    def mlp(name, d, ratio):
        ln(f"{name}.norm2", d)
        lin(f"{name}.mlp.fc1", d, int(d * ratio))
        lin(f"{name}.mlp.fc2", int(d * ratio), d)

    def block(name, d):
        ln(f"{name}.norm1", d)
        lin(f"{name}.attn.qkv", d, 3 * d)
        lin(f"{name}.attn.proj", d, d)
        mlp(name, d, 4.0)

    for m in ("rgb", "sar"):
        shapes[f"patch_embed_{m}.proj.weight"] = (d4, bands, patch // 4, patch // 4)
        shapes[f"patch_embed_{m}.proj.bias"] = (d4,)
        ln(f"patch_embed_{m}.norm", d4)
    shapes["absolute_pos_embed"] = (1, grid * grid, D)
    i = 0
    for d in (d4, d8):
        for _ in range(md):
            mlp(f"blocks.{i}", d, 3.0)
            i += 1
        ln(f"blocks.{i}.norm", 4 * d)
        lin(f"blocks.{i}.reduction", 4 * d, 2 * d, bias=False)
        i += 1
    for _ in range(c["depth"]):
        block(f"blocks.{i}", D)
        i += 1
    lin("align_dim_16tofpn", D, F_)
    lin("align_dim_16to8", d8, F_, bias=False)
    ln("split_16to8.norm", D)
    lin("split_16to8.reduction", D, 4 * F_, bias=False)
    mlp("block_16to8.0", F_, 4.0)
    lin("align_dim_8to4", d4, F_, bias=False)
    ln("split_8to4.norm", F_)
    lin("split_8to4.reduction", F_, 4 * F_, bias=False)
    mlp("block_8to4.0", F_, 4.0)
    for k in range(3):
        mlp(f"fpn_modules.{k}", F_, 4.0)
    for k in range(3):
        ln(f"decoder_embed.{k}.0", F_)
        lin(f"decoder_embed.{k}.1", F_, Dd // 4 ** k)
    for suffix in ("", "_cross"):
        shapes[f"mask_token{suffix}"] = (1, 1, Dd)
        for j in range(c["dec_depth"]):
            block(f"decoder_blocks{suffix}.{j}", Dd)
        ln(f"decoder_norm{suffix}", Dd)
    lin("decoder_pred", Dd, patch * patch * bands)
    lin("decoder_pred_cross", Dd, patch * patch)
    shapes["decoder_pos_embed"] = (1, grid * grid, Dd)
    lin("lm_head", Dd, c["teacher"])
    lin("lm_cls_head", D, c["teacher"])
    ln("norm", Dd)
    ln("norm_cls", D)
    for j in range(2):
        block(f"cls_pt_layers.{j}", D)
    for m in ("rgb", "sar"):
        pre = f"contrastive_loss.crossattn_{m}.cattn"
        ln(f"{pre}.n_q", Dd)
        ln(f"{pre}.n_kv", Dd)
        lin(f"{pre}.q", Dd, Dd)
        lin(f"{pre}.kv", Dd, 2 * Dd)
        lin(f"{pre}.proj", Dd, Dd)
    return {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}


# -- functional forward ---------------------------------------------------------------------------
def _ln(x, sd, pre, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[f"{pre}.weight"], sd[f"{pre}.bias"], eps)


def _lin(x, sd, pre):
    return F.linear(x, sd[f"{pre}.weight"], sd.get(f"{pre}.bias"))


def _mlp(x, sd, pre):
    return x + _lin(F.gelu(_lin(_ln(x, sd, f"{pre}.norm2"), sd, f"{pre}.mlp.fc1")), sd, f"{pre}.mlp.fc2")


def _block(x, sd, pre, heads):
    y = _ln(x, sd, f"{pre}.norm1")
    B, N, C = y.shape
    q, k, v = _lin(y, sd, f"{pre}.attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    a = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    x = x + _lin((a @ v).transpose(1, 2).reshape(B, N, C), sd, f"{pre}.attn.proj")
    return _mlp(x, sd, pre)


def _split(x, sd, pre, fpn):
    B, n, k, _, _ = x.shape
    x = _lin(_ln(x, sd, f"{pre}.norm"), sd, f"{pre}.reduction").reshape(B, n, k, k, 2, 2, fpn)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, n, 2 * k, 2 * k, fpn)


def reference_levels(sd, x, modality, ids_keep=None, patch=8, c=TINY):
    """Pyramid levels [(B, n, 1, 1, F), (B, n, 2, 2, F), (B, n, 4, 4, F)] of one modality."""
    key = "rgb" if modality == "optical" else "sar"
    w = sd[f"patch_embed_{key}.proj.weight"]
    B, h, wd = x.shape[0], x.shape[-2] // patch, x.shape[-1] // patch
    y = F.conv2d(x, w, sd[f"patch_embed_{key}.proj.bias"], stride=w.shape[-1])
    y = y.view(B, -1, h, 4, wd, 4).permute(0, 2, 4, 3, 5, 1).reshape(B, h * wd, 4, 4, -1)
    y = _ln(y, sd, f"patch_embed_{key}.norm")
    if ids_keep is not None:
        y = torch.gather(y, 1, ids_keep[:, :, None, None, None].expand(-1, -1, *y.shape[2:]))
    early, i = [], 0
    for _stage in range(2):
        for _ in range(c["mlp_depth"]):
            y = _mlp(y, sd, f"blocks.{i}")
            i += 1
        early.append(y)
        y = torch.cat([y[..., 0::2, 0::2, :], y[..., 1::2, 0::2, :], y[..., 0::2, 1::2, :], y[..., 1::2, 1::2, :]], -1)
        y = _lin(_ln(y, sd, f"blocks.{i}.norm"), sd, f"blocks.{i}.reduction")
        i += 1
    y = y[..., 0, 0, :]
    pos = sd["absolute_pos_embed"]
    if ids_keep is not None:  # the reference resamples by (h + 0.1) / h whenever tokens are masked
        s = int(pos.shape[1] ** 0.5)
        pos = F.interpolate(pos.reshape(1, s, s, -1).permute(0, 3, 1, 2), scale_factor=((h + 0.1) / s, (wd + 0.1) / s),
                            mode="bicubic").permute(0, 2, 3, 1).reshape(1, h * wd, -1)
        pos = torch.gather(pos.expand(B, -1, -1), 1, ids_keep[:, :, None].expand(-1, -1, pos.shape[-1]))
    y = y + pos
    for j in range(c["depth"]):
        y = _block(y, sd, f"blocks.{i + j}", c["num_heads"])
    y = y[:, :, None, None, :]
    outs = [_lin(y, sd, "align_dim_16tofpn")]
    y = _mlp(_split(y, sd, "split_16to8", c["fpn_dim"]) + _lin(early[1], sd, "align_dim_16to8"), sd, "block_16to8.0")
    outs.append(y)
    y = _mlp(_split(y, sd, "split_8to4", c["fpn_dim"]) + _lin(early[0], sd, "align_dim_8to4"), sd, "block_8to4.0")
    outs.append(y)
    return [_mlp(o, sd, f"fpn_modules.{k}") for k, o in enumerate(outs)]


def reference_decoder_tokens(sd, levels):
    """The shared decoder embedding: each level through its LN + Linear, summed: (B, n, Dd)."""
    out = 0
    for k, lv in enumerate(levels):
        y = _lin(_ln(lv, sd, f"decoder_embed.{k}.0"), sd, f"decoder_embed.{k}.1")
        out = out + y.reshape(lv.shape[0], lv.shape[1], -1)
    return out
