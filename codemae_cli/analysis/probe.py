"""Linear probing for segmentation on cached frozen features (the ablation's fast probe).

The paper's linear probe freezes the encoder and trains BatchNorm (no affine) + a linear layer.
With a frozen encoder the features of a chip never change, so they are computed once per chip
(one encoder pass per modality) and the probe trains on the cache: on a CPU this turns minutes
of encoder forwards per probe into seconds, which is what lets the ablation run all variants
with several seeds. Per-token logits are upsampled bilinearly to pixels, as a linear head on a
ViT does; the loss is pixel cross-entropy with the ignore index, the score mIoU on held-out
chips (``codemae_cli.tasks.metrics``).

``codemae finetune`` with ``task.linear_probe=true`` trains the same kind of probe through the
full engine (with augmentation); the ablation uses it at the ``gpu`` scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from codemae_cli.analysis.analyze import normalise_chips


def chip_arrays(dataset, indices: Sequence[int], stats: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised optical (N, Co, T, T), SAR (N, Cs, T, T) and labels (N, T, T) of ``indices``."""
    chips = [dataset.read(int(i)) for i in indices]
    opt = normalise_chips(np.stack([c["optical"] for c in chips]), stats["optical"])
    sar = normalise_chips(np.stack([c["sar"] for c in chips]), stats["sar"])
    if chips[0]["label"] is None:
        raise ValueError("the dataset has no labels to probe on")
    lab = np.stack([c["label"] for c in chips])
    return opt, sar, lab


def encode(model, optical: np.ndarray, sar: np.ndarray, *, layer: Optional[int] = None, batch_size: int = 64,
           device: str = "cpu") -> dict:
    """Frozen token maps of both modalities: dict optical/sar -> float32 (N, D, h, w)."""
    from codemae_cli.analysis.analyze import extract_features

    feats = extract_features(model, optical, sar, layer=layer, batch_size=batch_size, device=device)
    return {k: v.astype(np.float32) for k, v in feats.items()}


def linear_probe(train_feats, train_labels: np.ndarray, test_feats, test_labels: np.ndarray, num_classes: int, *,
                 steps: int = 300, batch_size: int = 64, lr: float = 0.01, seed: int = 0, ignore_index: int = 255,
                 class_names: Optional[Sequence[str]] = None, device: str = "cpu") -> dict:
    """Train BatchNorm(no affine) + Linear on cached token maps (N, D, h, w); test metrics.

    Returns ``segmentation_metrics`` of the test chips (miou, iou per class, oa, ...).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from codemae_cli.tasks.metrics import confusion_matrix, segmentation_metrics

    g = torch.Generator().manual_seed(seed)
    xtr = torch.from_numpy(np.ascontiguousarray(train_feats)).to(device)
    ytr = torch.from_numpy(np.ascontiguousarray(train_labels)).long().to(device)
    d = xtr.shape[1]
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm2d(d, affine=False), nn.Conv2d(d, num_classes, 1)).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    n = xtr.shape[0]
    size = tuple(ytr.shape[-2:])
    probe.train()
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[: min(batch_size, n)].to(device)
        logits = F.interpolate(probe(xtr[idx]), size=size, mode="bilinear", align_corners=False)  # (b, K, T, T)
        loss = F.cross_entropy(logits, ytr[idx], ignore_index=ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    probe.eval()
    xte = torch.from_numpy(np.ascontiguousarray(test_feats)).to(device)
    with torch.no_grad():
        pred = torch.cat([
            F.interpolate(probe(xte[s : s + 256]), size=size, mode="bilinear", align_corners=False).argmax(1)
            for s in range(0, xte.shape[0], 256)
        ])
    cm = confusion_matrix(pred.cpu().numpy(), test_labels, num_classes, ignore_index)
    return segmentation_metrics(cm, class_names)


def probe_inputs(feats: dict, inputs: str) -> np.ndarray:
    """Token maps a probe sees: one modality, or both concatenated along the channels."""
    if inputs == "both":
        return np.concatenate([feats["optical"], feats["sar"]], axis=1)
    return feats[inputs]


__all__ = ["chip_arrays", "encode", "linear_probe", "probe_inputs"]
