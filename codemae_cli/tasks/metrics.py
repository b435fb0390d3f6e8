"""Segmentation and classification metrics.

Segmentation metrics are all derived from one confusion matrix, accumulated over batches (and
summed across processes under DDP) so that mIoU is the IoU of the whole split, not a mean of
per-batch IoUs. Rows are the reference class, columns the prediction.

Classes that appear neither in the reference nor in the prediction have an undefined IoU/F1
(NaN); means skip them, as mmsegmentation and torchmetrics do with ``ignore absent``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows = reference, columns = prediction.

    ``pred`` and ``target`` are integer arrays or tensors of the same shape. Reference pixels equal
    to ``ignore_index`` are skipped; so are values outside ``[0, num_classes)`` in either input
    (a nodata prediction carries no class).
    """
    try:  # accept torch tensors without importing torch at module level
        import torch

        if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
            return confusion_torch(pred, target, num_classes, ignore_index).cpu().numpy()
        if isinstance(pred, torch.Tensor):
            pred = pred.detach().cpu().numpy()
        if isinstance(target, torch.Tensor):
            target = target.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    pred = np.asarray(pred).astype(np.int64, copy=False).ravel()
    target = np.asarray(target).astype(np.int64, copy=False).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size ({pred.size} vs {target.size})")
    keep = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_torch(pred, target, num_classes: int, ignore_index: int | None):
    """Same as :func:`confusion_matrix` on the tensors' device (no host sync until read)."""
    import torch

    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def segmentation_metrics(cm, class_names: Sequence[str] | None = None) -> dict:
    """Metrics of a confusion matrix (rows = reference, columns = prediction).

    Returns ``miou``, ``mf1``, ``oa`` (overall accuracy), ``macc`` (mean class recall),
    ``kappa`` (Cohen's), per-class lists ``iou``, ``f1``, ``precision``, ``recall``, ``support``
    (reference pixels), and ``classes`` when names are given. Undefined values are NaN.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError("confusion matrix must be square")
    tp = np.diag(cm)
    ref = cm.sum(axis=1)  # reference pixels per class
    prd = cm.sum(axis=0)  # predicted pixels per class
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        union = ref + prd - tp
        iou = np.where(union > 0, tp / union, np.nan)
        precision = np.where(prd > 0, tp / prd, np.where(ref > 0, 0.0, np.nan))
        recall = np.where(ref > 0, tp / ref, np.nan)
        f1 = np.where(ref + prd > 0, 2 * tp / (ref + prd), np.nan)
    oa = float(tp.sum() / total) if total > 0 else float("nan")
    expected = float((ref * prd).sum() / total**2) if total > 0 else float("nan")
    kappa = (oa - expected) / (1 - expected) if total > 0 and expected < 1 else float("nan")
    out = {
        "miou": _nanmean(iou),
        "mf1": _nanmean(f1),
        "oa": oa,
        "macc": _nanmean(recall),
        "kappa": float(kappa),
        "iou": iou.tolist(),
        "f1": f1.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "support": ref.astype(np.int64).tolist(),
        "pixels": int(total),
    }
    if class_names is not None:
        out["classes"] = list(class_names)
    return out


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each true positive.

    The non-interpolated definition used by scikit-learn's ``average_precision_score`` and by
    the micro-mAP of BigEarthNet / the CoDe-MAE linear-probing protocol. NaN without positives.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel() > 0
    npos = int(targets.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # Ties share one threshold: evaluate precision/recall only at the last element of each run.
    last = np.r_[np.diff(s) != 0, True]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / npos
    prev_recall = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev_recall) * precision))


def multilabel_metrics(scores, targets, threshold: float = 0.5, class_names: Sequence[str] | None = None) -> dict:
    """Multi-label metrics from per-class probabilities ``scores`` (N, K) and 0/1 ``targets``.

    ``micro_map`` (AP over all (sample, class) pairs, the paper's linear-probing metric),
    ``macro_map`` (mean of per-class AP over classes with positives), micro/macro F1 at
    ``threshold``, and per-class ``ap`` / ``f1``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError("scores and targets must both be (N, K)")
    pred = scores >= threshold
    tp = (pred & targets).sum(0).astype(np.float64)
    fp = (pred & ~targets).sum(0).astype(np.float64)
    fn = (~pred & targets).sum(0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    ap = np.array([average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])])
    out = {
        "micro_map": average_precision(scores, targets),
        "macro_map": _nanmean(ap),
        "micro_f1": float(2 * tp.sum() / denom) if denom > 0 else float("nan"),
        "macro_f1": _nanmean(f1),
        "ap": ap.tolist(),
        "f1": f1.tolist(),
        "support": targets.sum(0).astype(np.int64).tolist(),
        "samples": int(scores.shape[0]),
    }
    if class_names is not None:
        out["classes"] = list(class_names)
    return out


def classification_metrics(logits_or_pred, targets, num_classes: int, class_names: Sequence[str] | None = None) -> dict:
    """Single-label classification: the confusion-matrix metrics plus ``top1`` (= OA)."""
    pred = np.asarray(logits_or_pred)
    if pred.ndim == 2:
        pred = pred.argmax(1)
    cm = confusion_matrix(pred, np.asarray(targets), num_classes, ignore_index=None)
    out = segmentation_metrics(cm, class_names)
    out["top1"] = out["oa"]
    out["confusion"] = cm.tolist()
    return out


def is_better(metric: str, new: float, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` (all reported metrics are larger-is-better)."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    return best is None or (isinstance(best, float) and math.isnan(best)) or new > best


__all__ = [
    "average_precision",
    "classification_metrics",
    "confusion_matrix",
    "confusion_torch",
    "is_better",
    "multilabel_metrics",
    "segmentation_metrics",
]
