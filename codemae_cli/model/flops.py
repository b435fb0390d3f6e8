"""Analytic FLOP count of a training step (what the bench turns into TFLOP/s and MFU).

Counts matrix multiplications only, 2 FLOPs per multiply-add, like
``torch.utils.flop_counter.FlopCounterMode``: linears, the patch convolutions and the two
attention products (4 n^2 D per block and sample). Elementwise work (norms, softmax, GELU,
losses, target degradations) is left out; it is a few per cent at most.

Training = forward + backward. The backward of a matmul costs twice its forward (gradients
w.r.t. input and weight), so trainable parts count 3x their forward; the patch embeddings
count 2x (their input, the image, needs no gradient); the teacher counts its forward only.
"""

from __future__ import annotations

import functools
from typing import Optional

from codemae_cli.model.config import ModelConfig, preset_spec
from codemae_cli.model.targets import target_dim


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-norm ViT block on one sample of ``tokens`` tokens."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
    attention = 4 * tokens * tokens * dim  # q k^T and attn v
    return float(linear + attention)


def mlp_block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one attention-free (MLP-only) block on ``tokens`` tokens."""
    return float(2 * tokens * 2 * dim * int(dim * mlp_ratio))


def itpn_trunk_flops(spec: dict, n: int) -> float:
    """Forward FLOPs of the iTPN trunk for one image with ``n`` patches: the MLP stages on 16 and
    4 inner tokens per patch, the two patch merges and the transformer blocks (no neck)."""
    D, r, br = int(spec["embed_dim"]), float(spec["mlp_ratio"]), float(spec["bridge_mlp_ratio"])
    d4, d8, md = D // 4, D // 2, int(spec["mlp_depth"])
    early = md * (mlp_block_flops(16 * n, d4, br) + mlp_block_flops(4 * n, d8, br))
    merges = 2 * 4 * n * (4 * d4) * (2 * d4) + 2 * n * (4 * d8) * (2 * d8)
    return float(early + merges + int(spec["depth"]) * block_flops(n, D, r))


def itpn_neck_flops(spec: dict, n: int) -> float:
    """Forward FLOPs of the iTPN pyramid neck for one image with ``n`` patches."""
    D, F, r = int(spec["embed_dim"]), int(spec["fpn_dim"]), float(spec["mlp_ratio"])
    d4, d8 = D // 4, D // 2
    align = (2 * n * D * F if D != F else 0) + 2 * 4 * n * d8 * F + 2 * 16 * n * d4 * F
    split = 2 * n * D * 4 * F + 2 * 4 * n * F * 4 * F
    mlps = mlp_block_flops(4 * n, F, r) + mlp_block_flops(16 * n, F, r) + mlp_block_flops(21 * n, F, r)
    return float(align + split + mlps)


def patch_embed_flops(cfg: ModelConfig, bands: int, tokens: int) -> float:
    """Forward FLOPs of one image's patch embedding (``tokens`` patches): iTPN projects to D/4."""
    D = int(cfg.spec["embed_dim"])
    return float(2 * tokens * bands * cfg.patch_size ** 2 * (D // 4 if cfg.backbone == "itpn" else D))


def trunk_flops(cfg: ModelConfig, n: int) -> float:
    """Forward FLOPs of the trunk (no patch embedding, no neck) for one image of ``n`` patches."""
    spec = cfg.spec
    if cfg.backbone == "itpn":
        return itpn_trunk_flops(spec, n)
    return float(int(spec["depth"]) * block_flops(n, int(spec["embed_dim"]), float(spec["mlp_ratio"])))


@functools.lru_cache(maxsize=16)
def timm_teacher_shape(name: str) -> dict:
    """Shape facts of a timm ViT teacher, read from an instance on the meta device (no memory,
    no weights): width, depth, prefix tokens, patch size, input channels and the per-token
    multiply-adds of one block's linears (covers plain MLPs, SwiGLU, separate q/k/v)."""
    import timm
    import torch
    import torch.nn as nn

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    blocks = list(model.blocks)
    macs = sum(m.in_features * m.out_features for m in blocks[0].modules() if isinstance(m, nn.Linear))
    proj = model.patch_embed.proj
    return dict(
        dim=int(model.num_features),
        depth=len(blocks),
        prefix=int(getattr(model, "num_prefix_tokens", 1)),
        patch=int(proj.kernel_size[0]),
        in_chans=int(proj.in_channels),
        block_macs=int(macs),
    )


def teacher_forward_flops(cfg: ModelConfig, optical_bands: int, batch: int) -> float:
    """Forward-only FLOPs of the OKD teacher for ``batch`` optical images."""
    okd = cfg.okd
    if not okd.enabled:
        return 0.0
    if okd.teacher == "ema":
        N = cfg.grid ** 2
        return float(batch * (patch_embed_flops(cfg, optical_bands, N) + trunk_flops(cfg, N)))
    t = timm_teacher_shape(okd.teacher_model)
    grid = cfg.img_size // t["patch"]
    Nt = grid * grid
    n = Nt + t["prefix"]
    embed = 2 * Nt * t["in_chans"] * t["patch"] ** 2 * t["dim"]
    per_block = 2 * n * t["block_macs"] + 4 * n * n * t["dim"]
    return float(batch * (embed + t["depth"] * per_block))


def teacher_dim(cfg: ModelConfig) -> int:
    if cfg.okd.teacher == "ema":
        return int(cfg.spec["embed_dim"])
    return timm_teacher_shape(cfg.okd.teacher_model)["dim"]


def pretrain_step_breakdown(cfg: ModelConfig, optical_bands: int, sar_bands: int, batch: int,
                            world_size: int = 1) -> dict[str, float]:
    """Training-step FLOPs of CoDe-MAE per component for ``batch`` pairs on one process.

    ``world_size`` only enlarges the InfoNCE logits (negatives gathered from all ranks).
    """
    spec = cfg.spec
    D = int(spec["embed_dim"])
    Dd, Ld = int(spec["decoder_dim"]), int(spec["decoder_depth"])
    itpn = cfg.backbone == "itpn"
    r = float(spec["mlp_ratio"])
    p = cfg.patch_size
    N = cfg.grid ** 2
    n = int(N * (1 - cfg.mask_ratio))
    B = batch
    fwd: dict[str, float] = {}
    out: dict[str, float] = {}

    # fwd + weight grad; iTPN embeds all patches, then drops the masked ones (as the reference)
    out["patch_embed"] = 2.0 * B * (patch_embed_flops(cfg, optical_bands, N) + patch_embed_flops(cfg, sar_bands, N))
    fwd["trunk"] = 2 * B * trunk_flops(cfg, n)
    if itpn:
        fwd["neck"] = 2 * B * itpn_neck_flops(spec, n)
        fwd["decoder_embed"] = 2 * B * 3 * 2 * n * int(spec["fpn_dim"]) * Dd  # 3 levels, Dd per patch each
    else:
        fwd["decoder_embed"] = 2 * B * 2 * n * D * Dd
    fwd["self_decoder"] = 2 * B * Ld * block_flops(N, Dd, r) + 2 * B * N * Dd * (optical_bands + sar_bands) * p * p
    if cfg.cdr.enabled:
        k_sar = target_dim(cfg.cdr.degradation, sar_bands, p)
        k_opt = target_dim(cfg.cdr.degradation, optical_bands, p)
        fwd["cdr"] = 2 * B * Ld * block_flops(N, Dd, r) + 2 * B * N * Dd * (k_sar + k_opt)
    if cfg.okd.enabled:
        T = teacher_dim(cfg)
        okd = 2 * B * n * Dd * T
        if cfg.okd.aux_head:
            okd += B * 2 * block_flops(n, D, r) + 2 * B * n * D * T
        if cfg.okd.sar_side:
            okd += 2 * B * n * Dd * T
        fwd["okd"] = okd
        out["teacher"] = teacher_forward_flops(cfg, optical_bands, B)
    if cfg.ccl.mode != "off":
        d = Dd if cfg.ccl.mode == "conditioned" else (int(spec["fpn_dim"]) if itpn else D)
        ccl = 2 * (2 * B * (world_size * B) * d)  # two logit matrices
        if cfg.ccl.mode == "conditioned":
            ccl += 2 * B * (8 * n * Dd * Dd + 4 * n * n * Dd)  # q, kv, proj + attention, per direction
        fwd["ccl"] = ccl
    for k, v in fwd.items():
        out[k] = 3.0 * v
    return out


def pretrain_step_flops(cfg: ModelConfig, optical_bands: int, sar_bands: int, batch: int,
                        world_size: int = 1) -> float:
    """Analytic FLOPs of one CoDe-MAE training step (forward + backward) for ``batch`` pairs."""
    return float(sum(pretrain_step_breakdown(cfg, optical_bands, sar_bands, batch, world_size).values()))


def mae_step_flops(preset: str, in_chans: int, batch: int, img_size: int = 224, patch_size: int = 16,
                   mask_ratio: float = 0.75, cfg: Optional[ModelConfig] = None) -> float:
    """Analytic FLOPs of one plain single-modality MAE training step for ``batch`` images.

    Passing ``cfg`` takes preset, image size, patch size and mask ratio from it.
    """
    if cfg is not None:
        preset, img_size, patch_size, mask_ratio = cfg.preset, cfg.img_size, cfg.patch_size, cfg.mask_ratio
    spec = preset_spec(preset)
    D, L = int(spec["embed_dim"]), int(spec["depth"])
    Dd, Ld = int(spec["decoder_dim"]), int(spec["decoder_depth"])
    r = float(spec["mlp_ratio"])
    N = (img_size // patch_size) ** 2
    n = int(N * (1 - mask_ratio))
    p2c = patch_size * patch_size * in_chans
    embed = 2 * batch * N * p2c * D
    fwd = (batch * L * block_flops(n, D, r) + 2 * batch * n * D * Dd
           + batch * Ld * block_flops(N, Dd, r) + 2 * batch * N * Dd * p2c)
    return float(2 * embed + 3 * fwd)


__all__ = ["block_flops", "itpn_neck_flops", "itpn_trunk_flops", "mae_step_flops", "mlp_block_flops", "pretrain_step_breakdown", "pretrain_step_flops",
           "teacher_forward_flops"]
