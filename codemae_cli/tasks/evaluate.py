"""Evaluation: a fine-tuned checkpoint on a prepared split, or a predicted class raster against a
reference raster / vector file.

    metrics = evaluate_checkpoint("runs/seg", ["data/"], split="test")
    metrics = evaluate_raster("mask.tif", "buildings.gpkg", label_column=None)

Raster evaluation reconciles extents and CRS by bringing the reference onto the prediction's
grid: a reference raster is warped with nearest resampling (labels must not be blended), a
vector reference is reprojected and rasterised. Only pixels where both carry a class count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from codemae_cli.errors import UserError
from codemae_cli.tasks.metrics import (
    confusion_matrix,
    confusion_torch,
    multilabel_metrics,
    segmentation_metrics,
)


# --------------------------------------------------------------------------------------------
# model evaluation (shared with fine-tuning's validation)
# --------------------------------------------------------------------------------------------
def chip_class_targets(label, num_classes: int, ignore_index: int, multilabel: bool, min_fraction: float):
    """Classification targets from chip label masks (B, H, W).

    Multi-label: every class covering at least ``min_fraction`` of the chip's valid pixels
    (B, K) float. Single-label: the majority class (B,) long, -1 for chips without a valid pixel.
    """
    import torch

    b = label.shape[0]
    flat = label.reshape(b, -1).long()
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    counts = torch.zeros(b, num_classes, device=label.device, dtype=torch.float32)
    counts.scatter_add_(1, torch.where(valid, flat, torch.zeros_like(flat)), valid.float())
    total = counts.sum(1, keepdim=True)
    if multilabel:
        return ((counts / total.clamp_min(1)) >= min_fraction).float() * (total > 0).float()
    target = counts.argmax(1)
    return torch.where(total.squeeze(1) > 0, target, torch.full_like(target, -1))


def task_loss(logits, label, task, num_classes: int, class_weights=None):
    """Loss of a batch for the task config ``task`` (label: (B, H, W) long, ignore_index)."""
    import torch.nn.functional as F

    if task.kind == "segmentation":
        return F.cross_entropy(logits.float(), label, weight=class_weights, ignore_index=task.ignore_index)
    target = chip_class_targets(label, num_classes, task.ignore_index, task.multilabel, task.min_class_fraction)
    if task.multilabel:
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        if class_weights is not None:
            loss = loss * class_weights.view(1, -1)
        return loss.mean()
    return F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=-1)


def evaluate_model(model, loader, task, num_classes: int, device, precision: str = "auto",
                   class_names: Optional[Sequence[str]] = None, class_weights=None,
                   drop: Optional[str] = None) -> dict:
    """Metrics of ``model`` over ``loader`` (batches of dict optical/sar/label), all ranks summed.

    Segmentation: the confusion matrix over all valid pixels -> mIoU, per-class IoU, F1, OA.
    Classification: per-chip targets from the label masks (see :func:`chip_class_targets`).
    Also returns the mean ``loss``. ``drop`` leaves one modality out (see :func:`batch_inputs`).
    """
    import torch

    from codemae_cli.tasks.data import batch_inputs
    from codemae_cli.train.distributed import is_dist
    from codemae_cli.train.engine import autocast

    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = torch.zeros((), dtype=torch.float64, device=device)
    scores, targets = [], []
    with torch.no_grad():
        for batch in loader:
            optical, sar, label = batch_inputs(batch, device, task.ignore_index, drop)
            with autocast(device, precision):
                logits = model(optical=optical, sar=sar)
            logits = logits.float()
            loss_sum += task_loss(logits, label, task, num_classes, class_weights).double()
            n_batches += 1
            if task.kind == "segmentation":
                cm += confusion_torch(logits.argmax(1), label, num_classes, task.ignore_index)
            elif task.multilabel:
                t = chip_class_targets(label, num_classes, task.ignore_index, True, task.min_class_fraction)
                scores.append(torch.sigmoid(logits).cpu())
                targets.append(t.cpu())
            else:
                t = chip_class_targets(label, num_classes, task.ignore_index, False, task.min_class_fraction)
                keep = t >= 0
                cm += confusion_torch(logits.argmax(1)[keep], t[keep], num_classes, None)
    if is_dist():
        import torch.distributed as dist

        for t in (cm, loss_sum, n_batches):
            dist.all_reduce(t)
        if task.kind == "classification" and task.multilabel:
            scores = _gather_cat(scores, num_classes)
            targets = _gather_cat(targets, num_classes)
    loss = float(loss_sum / n_batches.clamp_min(1))
    if task.kind == "classification" and task.multilabel:
        if not scores:
            raise UserError("the evaluation split holds no chips")
        out = multilabel_metrics(torch.cat(scores).numpy(), torch.cat(targets).numpy(), class_names=class_names)
    else:
        cm_np = cm.cpu().numpy()
        if cm_np.sum() == 0:
            raise UserError("the evaluation split holds no labelled pixels")
        out = segmentation_metrics(cm_np, class_names)
        out["confusion"] = cm_np.tolist()
        if task.kind == "classification":
            out["top1"] = out["oa"]
    out["loss"] = loss
    return out


def _gather_cat(parts: list, num_classes: int) -> list:
    import torch
    import torch.distributed as dist

    local = torch.cat(parts) if parts else torch.zeros(0, num_classes)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [g for g in gathered if g is not None and len(g)]


def evaluate_checkpoint(checkpoint, datasets: Sequence[str], split: str = "test", batch_size: int = 8,
                        device: str = "auto", precision: str = "auto", num_workers: int = 0,
                        inputs: Optional[str] = None) -> dict:
    """Metrics of a fine-tuned checkpoint on ``split`` of prepared datasets.

    ``inputs`` ("optical" | "sar") evaluates a bi-modal model with the other modality missing.
    """
    from codemae_cli.device import resolve_device
    from codemae_cli.tasks.data import open_datasets, task_loader
    from codemae_cli.tasks.model_io import build_task_model_from_checkpoint

    dev = resolve_device(device)
    model, meta = build_task_model_from_checkpoint(checkpoint, device=dev)
    from codemae_cli.config import from_dict
    from codemae_cli.tasks.config import FinetuneRecipe

    recipe = from_dict(FinetuneRecipe, meta.recipe)
    task = recipe.task
    if inputs is not None:
        if inputs not in ("optical", "sar", "both"):
            raise UserError(f"--inputs must be optical, sar or both, not '{inputs}'")
        if meta.inputs != "both" and inputs != meta.inputs:
            raise UserError(f"this model was trained on {meta.inputs} input only; it cannot be evaluated on {inputs}")
    dsets = open_datasets(datasets)
    _check_dataset_fits(dsets, meta)
    loader = task_loader(dsets, split, recipe, train=False, batch_size=batch_size, num_workers=num_workers)
    drop = None if inputs in (None, "both") else ("sar" if inputs == "optical" else "optical")
    names = meta.class_names
    out = evaluate_model(model, loader, task, len(names), dev, precision, class_names=names, drop=drop)
    out["checkpoint"] = str(meta.path)
    out["split"] = split
    out["task"] = meta.task
    out["inputs"] = inputs or meta.inputs
    return out


def _check_dataset_fits(dsets, meta) -> None:
    for ds in dsets:
        if not ds.has_labels:
            raise UserError(f"prepared dataset '{ds.root}' has no labels; prepare it with --labels to evaluate")
        for mod in ("optical", "sar"):
            if meta.inputs not in (mod, "both"):
                continue
            want = len(meta.bands[mod])
            have = int(ds.meta[mod]["count"])
            if want != have:
                raise UserError(f"the checkpoint expects {want} {mod} band(s) but '{ds.root}' has {have}")


# --------------------------------------------------------------------------------------------
# raster vs reference
# --------------------------------------------------------------------------------------------
def _check_classes(pred: Path, given: Optional[Sequence[str]], tagged: Optional[list[str]]) -> Optional[list[str]]:
    """--classes must name the map's classes in its order when the map's tags name them: other
    names would relabel the classes silently."""
    if not given:
        return tagged
    given = list(given)
    if tagged and given != tagged:
        raise UserError(f"--classes names {len(given)} classes ({', '.join(given)}) but '{pred}' was made for "
                        f"{len(tagged)} ({', '.join(tagged)}); drop --classes or give the map's classes in order")
    return given


def _class_names_from_tags(tags: dict) -> Optional[list[str]]:
    for key in ("classes", "class_names", "CLASSES", "CLASS_NAMES"):
        raw = tags.get(key)
        if not raw:
            continue
        try:
            val = json.loads(raw)
        except ValueError:
            val = [s.strip() for s in raw.split(",") if s.strip()]
        if isinstance(val, dict):
            val = [val[k] for k in sorted(val, key=lambda s: int(s))]
        if isinstance(val, list):
            return [v["name"] if isinstance(v, dict) else str(v) for v in val]
    return None


def _read_raster(path: Path, what: str):
    from codemae_cli.data.raster import open_raster

    return open_raster(path, f"{what} raster")


def _reference_on_grid(ref: Path, grid, nodata_value: int, label_column: Optional[str],
                       class_names: Optional[list[str]],
                       ref_nodata: Optional[float] = None) -> tuple[np.ndarray, Optional[list[str]]]:
    """The reference as int32 labels on the prediction's grid; ``nodata_value`` where unknown.

    A raster reference is read like prepare reads label rasters (directly when on the grid,
    else nearest resampling); a vector reference is read and rasterised by prepare's reader.
    """
    from codemae_cli.data.labels import is_vector

    if is_vector(ref):
        return _rasterise_reference(ref, grid, label_column, class_names)
    from rasterio.warp import transform_bounds

    from codemae_cli.data.geo import Grid, read_on_grid, resampling_kernel

    with _read_raster(ref, "reference") as src:
        if src.crs is None:
            raise UserError(f"reference raster '{ref}' has no CRS")
        if not _overlap(transform_bounds(src.crs, grid.crs, *src.bounds), grid.bounds):
            raise UserError(f"reference '{ref}' does not overlap the prediction")
        nodata = ref_nodata if ref_nodata is not None else src.nodata  # --ref-nodata, else the file's

        def prepare(block: np.ndarray) -> np.ndarray:
            out = block.astype(np.int32)
            if nodata is not None and not math.isnan(nodata):
                out[block == nodata] = nodata_value
            return out

        kernel = resampling_kernel(Grid.of(src), grid, "label")
        dst = read_on_grid(src, grid, 0, 0, grid.height, grid.width, kernel=kernel, prepare=prepare,
                           out_dtype=np.int32, fill=nodata_value)[0]
        names = _class_names_from_tags(src.tags())
    return dst, names


def _rasterise_reference(ref: Path, grid, label_column: Optional[str], class_names: Optional[list[str]]):
    """A vector reference on the prediction's grid, read as prepare reads vector labels
    (:class:`~codemae_cli.data.labels.VectorLabels`): the same file means the same pixels."""
    from codemae_cli.data.labels import VectorLabels

    labels = VectorLabels(ref, label_column, class_names, grid.crs_wkt, what="reference")
    if not _overlap(tuple(labels.gdf.total_bounds), grid.bounds):
        raise UserError(f"reference '{ref}' does not overlap the prediction")
    return labels.rasterize(grid, 0, 0, grid.height, grid.width).astype(np.int32), labels.names


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def evaluate_raster(pred, ref, label_column: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                    ignore_index: int = 255, band: int = 1, ref_nodata: Optional[float] = None) -> dict:
    """Metrics of a predicted class raster against a reference raster or vector file.

    ``ref_nodata``: the reference raster's value for unlabelled pixels when the file does not
    declare it (e.g. -1 in Sen1Floods11); those pixels are not scored."""
    from codemae_cli.data.geo import Grid

    pred = Path(pred)
    ref = Path(ref)
    with _read_raster(pred, "predicted") as src:
        if src.crs is None:
            raise UserError(f"predicted raster '{pred}' has no CRS")
        if not 1 <= band <= src.count:
            raise UserError(f"predicted raster '{pred}' has {src.count} band(s); band {band} does not exist")
        if np.dtype(src.dtypes[band - 1]).kind == "f":
            raise UserError(f"predicted raster '{pred}' holds floating-point values; evaluate a class map")
        data = src.read(band).astype(np.int64)
        valid = src.read_masks(band) > 0
        grid = Grid.of(src)
        names = _check_classes(pred, classes, _class_names_from_tags(src.tags()))
    if not valid.any():
        raise UserError(f"predicted raster '{pred}' holds only nodata")
    nodata_value = -1
    reference, ref_names = _reference_on_grid(ref, grid, nodata_value, label_column, names, ref_nodata)
    names = names or ref_names
    keep = valid & (reference != nodata_value) & (reference != ignore_index)
    if not keep.any():
        raise UserError("the prediction and the reference share no valid pixel")
    if (reference[keep] < 0).any():
        v = int(reference[keep].min())
        raise UserError(f"reference '{ref}' holds the value {v}, not a class code; if {v} marks unlabelled pixels, "
                        f"pass --ref-nodata {v}")
    if names:
        k = len(names)
    else:
        k = int(max(data[keep].max(), reference[keep].max())) + 1
    too_big = max(int(data[keep].max()), int(reference[keep].max()))
    if too_big >= k:
        raise UserError(f"class id {too_big} is outside the {k} class names given")
    cm = confusion_matrix(data[keep], reference[keep], k, ignore_index=None)
    out = segmentation_metrics(cm, names or [str(i) for i in range(k)])
    out["confusion"] = cm.tolist()
    out["prediction"] = str(pred)
    out["reference"] = str(ref)
    out["valid_fraction"] = float(keep.mean())
    return out


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}"


def metrics_table(metrics: dict, title: str = "metrics"):
    """A rich Table: one row per class (IoU, F1, precision, recall / AP) plus the summary line."""
    from rich.table import Table

    names = metrics.get("classes") or [str(i) for i in range(len(metrics.get("iou", metrics.get("ap", []))))]
    table = Table(title=title)
    table.add_column("class")
    if "iou" in metrics:
        for col in ("IoU %", "F1 %", "precision %", "recall %", "support"):
            table.add_column(col, justify="right")
        for i, name in enumerate(names):
            table.add_row(name, _fmt(metrics["iou"][i]), _fmt(metrics["f1"][i]), _fmt(metrics["precision"][i]),
                          _fmt(metrics["recall"][i]), f"{metrics['support'][i]:,}")
        table.add_section()
        table.add_row("[bold]mean[/bold]", f"[bold]{_fmt(metrics['miou'])}[/bold]", _fmt(metrics["mf1"]), "",
                      _fmt(metrics["macc"]), f"{sum(metrics['support']):,}")
        table.caption = f"OA {_fmt(metrics['oa'])} %   kappa {metrics['kappa']:.4f}"
    else:
        for col in ("AP %", "F1 %", "support"):
            table.add_column(col, justify="right")
        for i, name in enumerate(names):
            table.add_row(name, _fmt(metrics["ap"][i]), _fmt(metrics["f1"][i]), f"{metrics['support'][i]:,}")
        table.add_section()
        table.add_row("[bold]micro / macro mAP[/bold]", f"{_fmt(metrics['micro_map'])} / {_fmt(metrics['macro_map'])}",
                      f"{_fmt(metrics['micro_f1'])} / {_fmt(metrics['macro_f1'])}", f"{metrics['samples']:,}")
    return table


def write_json(metrics: dict, path) -> Path:
    """Write metrics as JSON atomically (NaN becomes null)."""
    from codemae_cli.fsutil import staged_file

    path = Path(path)
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(jsonable(metrics), indent=2))
    return path


def jsonable(o):
    """``o`` with NaN/inf as None, numpy/torch scalars as Python numbers and tuples as lists (JSON-safe)."""
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "item"):
        return jsonable(o.item())
    return o


__all__ = [
    "chip_class_targets",
    "evaluate_checkpoint",
    "evaluate_model",
    "evaluate_raster",
    "jsonable",
    "metrics_table",
    "task_loss",
    "write_json",
]
